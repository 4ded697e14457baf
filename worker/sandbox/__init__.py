"""Faithful simulators of the five providers' Clients APIs, for demos, tests and benchmarks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.sandbox.base import SandboxProvider

#: provider name -> "module:Class"; one line per simulator
SIMULATORS: dict[str, str] = {
    "request_finance": "worker.sandbox.request_finance:RequestFinanceSandbox",
    "invoice_ninja": "worker.sandbox.invoice_ninja:InvoiceNinjaSandbox",
    "grow_crm": "worker.sandbox.grow_crm:GrowCRMSandbox",
    "lsp_expert": "worker.sandbox.lsp_expert:LSPExpertSandbox",
    "qonto": "worker.sandbox.qonto:QontoSandbox",
}


def simulator_class(name: str) -> type[SandboxProvider]:
    module_name, _, class_name = SIMULATORS[name].partition(":")
    cls: type[SandboxProvider] = getattr(importlib.import_module(module_name), class_name)
    return cls
