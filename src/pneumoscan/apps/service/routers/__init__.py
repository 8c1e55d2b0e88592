"""One ``APIRouter`` per resource; :func:`~pneumoscan.apps.service.app.create_app` includes them all."""
