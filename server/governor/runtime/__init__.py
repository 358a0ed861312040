"""The composition root: ``bootstrap.py`` builds the engine pool, the policy and the adapter registry from
the settings, ``app.py`` assembles the gateway around them, ``server.py`` runs it under uvicorn (draining
on SIGTERM) and ``limits.py`` raises the open-file limit first.
"""
