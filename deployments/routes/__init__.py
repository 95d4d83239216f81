"""The ingress's routes, one module per resource; each holds a FastAPI ``APIRouter`` whose routes take
the serving replica (``replica.Replica``) through the ``ReplicaDep`` dependency, parse and check the
request, call down (the query layer, the deployments' handles) and answer with the envelope.

``ROUTERS`` is the order ``deployments/ingress.py`` includes them in, which is the order routes match in.
"""

from fastapi import APIRouter

from deployments.routes import images, imports, libraries, operations, search

ROUTERS: tuple[APIRouter, ...] = (
    operations.router,
    libraries.router,
    images.router,
    imports.router,
    search.router,
)

__all__ = ["ROUTERS"]
