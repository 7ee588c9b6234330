"""The inbox API: pages, unread counts and read state, pushed to every tab."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from contracts.settings import Settings
from tests.sse import helpers
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.sse import SSEClient

pytestmark = pytest.mark.integration


def client(gateway: Service, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gateway.url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


async def delivered(settings: Settings, user_id: int, count: int) -> list[int]:
    """The ids of ``count`` notifications put into the user's inbox, in order."""
    async with helpers.database(settings.database_url) as pg:
        return [
            await helpers.add_and_deliver(pg, user_id, f"n{i}") for i in range(count)
        ]


async def test_pages_newest_first_with_counts_read_and_archive(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    async with helpers.database(settings.database_url) as pg:
        ids = [await helpers.add_and_deliver(pg, demo.bob, f"n{i}") for i in range(7)]
        await helpers.add_and_deliver(pg, demo.alice, "not bob's")

    async with client(gateway, token(demo.bob)) as bob:
        pages, cursor = [], None
        while True:
            params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
            page = (await bob.get("/inbox", params=params)).json()
            pages.append([item["id"] for item in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [ids[6:3:-1], ids[3:0:-1], ids[0:1]]
        assert page["unread"] == 7

        one = (await bob.post(f"/inbox/{ids[2]}/read")).json()
        again = (await bob.post(f"/inbox/{ids[2]}/read")).json()
        assert one == {"marked": [ids[2]], "unread": 6}
        assert again == {"marked": [], "unread": 6}

        gone = (await bob.post(f"/inbox/{ids[5]}/archive")).json()
        assert gone == {"archived": [ids[5]], "unread": 5}
        listed = (await bob.get("/inbox")).json()
        assert [i["id"] for i in listed["items"]] == [
            ids[6], ids[4], ids[3], ids[2], ids[1], ids[0]
        ]  # fmt: skip
        read_at = {i["id"]: i["read_at"] for i in listed["items"]}
        assert read_at[ids[2]] is not None and read_at[ids[3]] is None

        everything = (await bob.post("/inbox/read-all")).json()
        assert sorted(everything["marked"]) == sorted(
            [ids[0], ids[1], *ids[3:5], ids[6]]
        )
        assert everything["unread"] == 0
        assert (await bob.get("/inbox/unread-count")).json() == {"unread": 0}

        bad = await bob.get("/inbox", params={"limit": 0})
        missing = await bob.post("/inbox/999999/read")
    assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "limit"
    assert missing.status_code == 404


async def test_a_page_that_ends_the_inbox_names_no_next_page(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    ids = await delivered(settings, demo.bob, 6)

    async with client(gateway, token(demo.bob)) as bob:
        first = (await bob.get("/inbox", params={"limit": 3})).json()
        last = (
            await bob.get("/inbox", params={"limit": 3, "cursor": first["next_cursor"]})
        ).json()
        whole = (await bob.get("/inbox", params={"limit": 6})).json()

    assert [i["id"] for i in last["items"]] == ids[2::-1]
    assert last["next_cursor"] is None
    assert len(whole["items"]) == 6 and whole["next_cursor"] is None


async def test_counts_stay_exact_under_concurrent_changes(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    ids = await delivered(settings, demo.bob, 30)

    async with client(gateway, token(demo.bob)) as bob:
        answers = await asyncio.gather(
            *(bob.post(f"/inbox/{i}/read") for i in ids),
            *(bob.post(f"/inbox/{ids[0]}/read") for _ in range(5)),
        )
        final = (await bob.get("/inbox/unread-count")).json()
    assert [a.status_code for a in answers] == [200] * 35, answers[0].text
    bodies = [a.json() for a in answers]
    marked = [b["marked"] for b in bodies if b["marked"]]
    # Changes are serialised: each one that marked something saw a distinct count.
    assert sorted(m[0] for m in marked) == sorted(ids)
    assert sorted(b["unread"] for b in bodies if b["marked"]) == list(range(30))
    assert final == {"unread": 0}


async def test_read_state_reaches_the_users_other_tabs(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    bob = token(demo.bob)
    async with helpers.database(settings.database_url) as pg:
        first = await helpers.add_and_deliver(pg, demo.bob, "first")
        second = await helpers.add_and_deliver(pg, demo.bob, "second")
        third = await helpers.add_and_deliver(pg, demo.bob, "third")

    async with (
        SSEClient(f"{gateway.url}/sse?token={bob}") as other_tab,
        SSEClient(f"{gateway.url}/sse?token={token(demo.alice)}") as alice,
        client(gateway, bob) as this_tab,
    ):
        await this_tab.post(f"/inbox/{first}/read")
        [read] = await other_tab.wait_for("read")
        await this_tab.post(f"/inbox/{second}/archive")
        [archived] = await other_tab.wait_for("archived")
        await this_tab.post("/inbox/read-all")
        await other_tab.wait_for("read", 2)
        async with helpers.database(settings.database_url) as pg:
            fresh = await helpers.add_and_deliver(pg, demo.bob, "fresh")
        [note] = await other_tab.wait_for("notification")

    assert read.json() == {"ids": [first], "unread": 2}
    assert archived.json() == {"ids": [second], "unread": 1}
    assert other_tab.of("read")[1].json() == {"ids": [third], "unread": 0}
    assert note.json()["id"] == fresh and note.json()["unread"] == 1
    assert alice.events == []
