""" Publishing timm-dbp runs on the Hugging Face Hub and loading them back through timm

    python -m hub.publish RUN_DIR_OR_CHECKPOINT --repo-id ORG/NAME [--fold] [--private] [--dry-run --out DIR]

hub.publish writes and uploads a Hub folder (model.safetensors, timm's config.json, a model card); hub.load loads
a published model with errors that name the file or key; hub.cache installs a folder into the local Hugging Face
cache for machines without network.
"""
from .cache import place_in_hf_cache

__all__ = ['place_in_hf_cache']
