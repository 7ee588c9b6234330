"""Reading delivery messages the way the senders do."""

from __future__ import annotations

from contracts.messages import DeliveryBatch, DeliveryRequested, decode_items


def deliveries_in(body: bytes) -> list[DeliveryRequested]:
    """The deliveries a message carries: one, or the items of a DeliveryBatch."""
    items, _ = decode_items(DeliveryRequested, bytes(body), DeliveryBatch)
    return items
