"""HTTP server: app factory, OCI routes, middleware, ops endpoints."""
