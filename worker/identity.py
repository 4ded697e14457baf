"""Which provider record is this client's: one mechanism over each adapter's `Identity` data.

Two questions, both answered by provider searches (`ProviderAdapter.search`), never by a guess:

- `exact_matches`: records that ARE this client by the provider's exact keys: stamped with
  its source id, or matching a field the provider keeps unique (and not stamped with another
  id). Used before every first create (onboarding an account that already holds the client)
  and to settle an unclear create where a stamp exists.
- `lookalikes`: after a create whose answer was lost at a provider without exact keys for
  this client, records found by non-unique fields that carry the whole payload sent and were
  created at or after the recorded intent.
- `namesakes`: before a first create, records found by non-unique fields that nobody stamped
  (e.g. made by hand before clientsync was turned on). They may or may not be this client, so
  they are never adopted automatically: the job asks an operator instead of creating a
  duplicate.

The caller (`worker.sync`) then drops every candidate linked to another client (the reverse
links in `worker.store`) and decides: one -> adopt, none -> create, several -> an operator.
"""

from __future__ import annotations

from worker.models import Client
from worker.providers.base import ProviderAdapter, RemoteClient

#: a provider's clock and ours may disagree a little: "created at or after the intent" allows this
CLOCK_SKEW_SECONDS = 120.0
#: providers report creation times to the second (LSP.expert): "created before clientsync first
#: wrote here" must be clear of that rounding, or clientsync's own first records would qualify
CREATED_RESOLUTION_SECONDS = 2.0


def field_value(client: Client, key: str) -> str | None:
    if key == "email" and not client.email:
        primary = client.primary_contact
        return primary.email if primary else None
    if key == "name":
        return client.display_name
    value = getattr(client, key, None)
    return str(value) if value not in (None, "") else None


def exact_keys(adapter: ProviderAdapter, client: Client) -> list[tuple[str, str]]:
    """The (key, value) searches that identify `client` exactly at this provider."""
    out: list[tuple[str, str]] = []
    if adapter.stamp_field is not None:
        out.append(("stamp", client.id))
    for key in adapter.identity.unique:
        value = field_value(client, key)
        if value:
            out.append((key, value))
    return out


async def exact_matches(adapter: ProviderAdapter, client: Client) -> list[RemoteClient]:
    """Records that are `client` by exact keys; a stamp match, when there is one, settles it."""
    found: dict[str, RemoteClient] = {}
    for key, value in exact_keys(adapter, client):
        for remote in await adapter.search(key, value):
            stamp = adapter.stamped(remote)
            if key == "stamp" or stamp in (None, client.id):
                found.setdefault(remote.id, remote)
        if key == "stamp" and found:
            break  # our own stamp: nothing else can be more certain
    return list(found.values())


async def _similar(adapter: ProviderAdapter, client: Client) -> list[RemoteClient]:
    """Records sharing any of `client`'s non-unique keys (one search each, or one pass where
    the adapter reads a single unfiltered list: `ProviderAdapter.search_any`)."""
    searches = [(key, value) for key in adapter.identity.similar if (value := field_value(client, key))]
    return await adapter.search_any(searches) if searches else []


async def lookalikes(adapter: ProviderAdapter, client: Client, *, since: float | None) -> list[RemoteClient]:
    """After an unclear create: records by non-unique fields that carry the whole payload sent,
    created at or after `since` (unix seconds of the recorded intent), stamped by nobody else."""
    found = []
    for remote in await _similar(adapter, client):
        if adapter.stamped(remote) not in (None, client.id):
            continue
        created = adapter.created_at(remote)
        if since is not None and created is not None and created < since - CLOCK_SKEW_SECONDS:
            continue
        if adapter.same_payload(remote, client):
            found.append(remote)
    return found


async def namesakes(adapter: ProviderAdapter, client: Client, *, before: float) -> list[RemoteClient]:
    """Records found by non-unique fields that carry no stamp at all and were created before
    `before` (when clientsync first wrote to this provider; records whose creation time the
    provider does not say count too): possibly this client, made by hand before clientsync
    ran. An operator decides. Records created since are clientsync's own: linked to their
    client, or settled by their create's intent."""
    found = []
    for remote in await _similar(adapter, client):
        if adapter.stamp_field is not None and adapter.stamped(remote) is not None:
            continue
        created = adapter.created_at(remote)
        if created is None or created < before - CREATED_RESOLUTION_SECONDS:
            found.append(remote)
    return found
