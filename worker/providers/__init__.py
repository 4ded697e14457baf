"""The provider registry: one adapter module per provider, listed here explicitly."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from worker.models import PROVIDER_NAMES

if TYPE_CHECKING:
    from worker.providers.base import ProviderAdapter, ProviderConfig

#: provider name -> "module:Class"; adding a provider is one line here
REGISTRY: dict[str, str] = {
    "request_finance": "worker.providers.request_finance:RequestFinance",
    "invoice_ninja": "worker.providers.invoice_ninja:InvoiceNinja",
    "grow_crm": "worker.providers.grow_crm:GrowCRM",
    "lsp_expert": "worker.providers.lsp_expert:LSPExpert",
    "qonto": "worker.providers.qonto:Qonto",
}
assert tuple(REGISTRY) == PROVIDER_NAMES


def adapter_class(name: str) -> type[ProviderAdapter]:
    """The adapter class registered under `name`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(REGISTRY)}")
    module_name, _, class_name = REGISTRY[name].partition(":")
    module = importlib.import_module(module_name)
    cls: type[ProviderAdapter] = getattr(module, class_name)
    return cls


def load_configs() -> dict[str, ProviderConfig]:
    """Every provider's settings from the environment, configured or not."""
    return {name: adapter_class(name).settings_class() for name in REGISTRY}


def enabled_configs() -> dict[str, ProviderConfig]:
    """Only the providers whose credentials are set."""
    return {name: cfg for name, cfg in load_configs().items() if cfg.is_configured()}
