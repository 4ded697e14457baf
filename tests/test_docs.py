"""The README documents what the code reads: every setting and every provider variable."""

from __future__ import annotations

from tests.conftest import REPO
from worker.providers import adapter_class
from worker.providers.base import ProviderConfig
from worker.settings import Settings

README = (REPO / "README.md").read_text()


def test_every_setting_is_documented_with_its_default() -> None:
    missing = [f"CLIENTSYNC_{name.upper()}" for name in Settings.model_fields
               if f"`CLIENTSYNC_{name.upper()}`" not in README]
    assert missing == []


def test_every_provider_credential_variable_is_documented() -> None:
    shared = set(ProviderConfig.model_fields)
    for name in ("request_finance", "invoice_ninja", "grow_crm", "lsp_expert", "qonto"):
        cls = adapter_class(name).settings_class
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field in set(cls.model_fields) - shared:
            var = f"{prefix}{field}".upper()
            assert f"`{var}`" in README, var


def test_the_readme_leads_with_the_two_commands() -> None:
    head = README[:600]
    assert "make run" in head and "make test" in head


def test_docs_providers_md_is_generated_from_the_adapters() -> None:
    from worker.providers.catalog import render

    assert (REPO / "docs" / "providers.md").read_text() == render(), (
        "run: python -m worker.providers.catalog > docs/providers.md")


def test_every_adapter_maps_every_canonical_field() -> None:
    from worker.models import Client
    from worker.providers.catalog import PROVIDERS

    for name in PROVIDERS:
        field_map = adapter_class(name).field_map
        assert set(Client.model_fields) - {"id"} <= set(field_map), name
        for field, how in field_map.items():
            assert how.startswith(("sent as", "not supported", "derived")), (name, field, how)


def test_the_readme_states_the_identity_guarantee_per_provider() -> None:
    from worker.providers.catalog import identity_table

    assert identity_table() in README
