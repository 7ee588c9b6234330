"""Reading delivery messages the way the senders do."""

from __future__ import annotations

from contracts.messages import DeliveryBatch, DeliveryRequested, decode_items


def deliveries_in(body: bytes) -> list[DeliveryRequested]:
    """The deliveries a message carries: one, or the items of a DeliveryBatch."""
    parts, _ = decode_items(DeliveryRequested, bytes(body), DeliveryBatch)
    return [part.message for part in parts if part.message is not None]
