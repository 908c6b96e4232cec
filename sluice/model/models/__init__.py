"""Model implementations and the architecture registry."""

from sluice.model.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "supported_architectures"]
