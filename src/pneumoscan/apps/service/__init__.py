"""The web service: an app factory (:mod:`.app`), one router per resource (:mod:`.routers`), dependencies, middleware."""
