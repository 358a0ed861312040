"""Every ``governor`` command: ``main.py`` (serve, model, the command itself), ``adapters.py``
(``governor adapters …``), ``merge.py`` (``governor adapters merge``), ``bench.py`` (``governor bench …``)
and ``eval.py`` (``governor eval …``).
"""
