"""The request path: a route hands the service (``service.py``) a typed request (``request.py``) in a
``scope`` that holds every lease it takes; the service checks the key's quota (``quota.py``), asks the
model ``catalog`` for the target, builds the upstream body with the policy, opens the engine and relays
the answer. ``readiness.py`` is the probe behind ``/ready``. No web framework here: ``api/`` turns the
service's answer into a response.
"""
