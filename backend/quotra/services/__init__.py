"""Relay services: listings, the payment gate and the call path, used by the API routers."""
