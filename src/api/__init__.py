"""HTTP edge: Litestar app factory, controllers, rendering, authentication, error mapping."""
