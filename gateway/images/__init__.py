"""Images: a content-addressed OCI image store, reproducible builds, verification, shipping.

Kept light to import: the node runner uses ``oci``, ``unpack``, ``podman`` and ``check``
(stdlib only); ``recipe`` and ``build`` (pydantic) are for the gateway side.
"""
