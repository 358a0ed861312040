"""The web page at /ui: a status view, a side-by-side decoding playground and the loop eval as charts.

`static/` holds the page (hand-written HTML, JS and CSS: no build step, no CDN, nothing fetched from
elsewhere), shipped as package data; `status.py` and `eval_view.py` build what its two JSON calls
return; the routes, their auth and headers are in `governor.api.ui_routes`. The playground itself
calls /v1 like any client.
"""
