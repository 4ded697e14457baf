"""docs/providers.md, generated from the adapters' own declarations (`identity`, `field_map`).

    python -m worker.providers.catalog > docs/providers.md

`tests/test_docs.py` keeps the file in step with the code, so the tables an operator reads are
the rules the adapters run by.
"""

from __future__ import annotations

from worker.models import Client
from worker.providers import adapter_class
from worker.providers.base import ProviderAdapter
from worker.sandbox import SIMULATORS

PROVIDERS: tuple[str, ...] = tuple(SIMULATORS)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _exactness(cls: type[ProviderAdapter]) -> tuple[str, str]:
    ident = cls.identity
    exact = []
    if ident.stamp:
        exact.append(f"source id stamped into `{ident.stamp}` (prefixed `{cls.STAMP_PREFIX}`)")
    exact += [f"`{k}` (kept unique by the provider)" for k in ident.unique]
    similar = ", ".join(f"`{k}`" for k in ident.similar) or "none"
    return ("; ".join(exact) or "none", similar)


def identity_table() -> str:
    lines = [
        "| provider | exact (adopted without asking) | similar only (never adopted on a guess) | "
        "an operator decides when |",
        "| --- | --- | --- | --- |",
    ]
    for name in PROVIDERS:
        cls = adapter_class(name)
        exact, similar = _exactness(cls)
        if exact == "none":
            when = ("a first sync finds unstamped records with the same similar keys made before clientsync "
                    "first wrote here; or several records carry the payload of a create whose answer was lost")
        else:
            when = ("several records match the exact keys, or (first sync) unstamped records made before "
                    "clientsync share a similar key")
        lines.append(f"| {cls.title} | {_cell(exact)} | {_cell(similar)} | {when} |")
    return "\n".join(lines)


def evidence() -> str:
    out = []
    for name in PROVIDERS:
        cls = adapter_class(name)
        out.append(f"- **{cls.title}**: {_cell(cls.identity.notes)}")
    return "\n".join(out)


def field_table() -> str:
    names = [n for n in Client.model_fields if n != "id"]
    classes = [adapter_class(n) for n in PROVIDERS]
    lines = ["| canonical field | " + " | ".join(c.title for c in classes) + " |",
             "| --- |" + " --- |" * len(classes)]
    for field in names:
        cells = [_cell(c.field_map.get(field, "not declared")) for c in classes]
        lines.append(f"| `{field}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render() -> str:
    return f"""# Providers: identity and field mapping

Generated from the adapters' declarations by `python -m worker.providers.catalog > docs/providers.md`
(a test keeps it in step with the code). Every rule cites its evidence in the adapter's module
docstring; what is unconfirmed against a live account is marked there with `[?]`.

## Identity: which provider record is this client's

A provider record belongs to at most one source client (the reverse link
`cs:owner:<provider>:<provider id>` is written and removed with the link). A record linked to
another client is never adopted, updated or deleted, and a delete acts only on the client's
own link (or on a record that is provably its own unanswered create: stamped with its id, or
carrying exactly the payload that create sent, created since, owned by nobody).

Before every first create, clientsync looks the client up by its **exact** keys and adopts one
unowned match (onboarding an account that already holds the client; `clientsync link` does the
same for a whole account at once). After a create whose answer was lost, a record found by
**similar** keys is adopted only if it carries the whole payload that create sent, was created
at or after its recorded intent and is owned by nobody. Whenever more than one record could be
the client, the job stops as `needs_attention` with its candidates, and an operator adopts one
or creates a new record (`POST /monitor/jobs/<id>/resolve`, `clientsync resolve`, the dashboard).

{identity_table()}

Evidence:

{evidence()}

## Field mapping: canonical field -> provider

"sent as" names the provider's field; "not supported" fields set on a client are recorded on
the job (`unsupported_fields` in the monitor API and the dashboard), never dropped silently.

{field_table()}
"""


if __name__ == "__main__":
    print(render(), end="")
