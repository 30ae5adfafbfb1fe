"""layerstore: a content-addressed, verified, deduplicated store of OCI image layers."""
