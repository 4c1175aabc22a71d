import anyio
import pytest

from pipeline.batching import MicroBatcher


async def _batches(items, **kw):
    send, receive = anyio.create_memory_object_stream[int](100)
    async with send:
        for i in items:
            await send.send(i)
    b = MicroBatcher(receive, **kw)
    out = []
    with anyio.fail_after(5), receive:
        while (batch := await b.next_batch()) is not None:
            out.append(batch)
    return out


async def test_respects_max_size_and_drains_everything():
    out = await _batches(range(10), max_size=4, max_wait_s=0.0)
    assert [len(b) for b in out] == [4, 4, 2]
    assert sorted(x for b in out for x in b) == list(range(10))


async def test_groups_similar_lengths_and_keeps_the_oldest():
    lengths = [10, 100, 11, 101, 12, 102]
    out = await _batches(range(6), max_size=3, max_wait_s=0.0, length=lambda i: lengths[i])
    assert out[0] == [0, 2, 4]  # item 0 (oldest) with the two closest in length
    assert out[1] == [1, 3, 5]


async def test_token_cap_limits_batch_but_never_drops_an_item():
    lengths = [50, 50, 50, 500]
    out = await _batches(
        range(4), max_size=8, max_wait_s=0.0, length=lambda i: lengths[i], reserve=50, max_tokens=250
    )
    # 2 rows of width 50+50 = 200 fit, 3 do not; the 500-token item goes alone although over the cap
    assert [sorted(b) for b in out] == [[0, 1], [2], [3]]


async def test_waits_up_to_max_wait_for_a_full_batch():
    send, receive = anyio.create_memory_object_stream[int](10)
    b = MicroBatcher(receive, max_size=3, max_wait_s=0.5)

    async def late_sender():
        await send.send(1)
        await anyio.sleep(0.05)
        await send.send(2)
        await send.send(3)
        await anyio.sleep(0.05)
        await send.aclose()

    with anyio.fail_after(5), receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(late_sender)
            first = await b.next_batch()
            assert first == [1, 2, 3]
            assert await b.next_batch() is None


async def test_returns_partial_batch_after_max_wait():
    send, receive = anyio.create_memory_object_stream[int](10)
    b = MicroBatcher(receive, max_size=8, max_wait_s=0.05)
    await send.send(1)
    with anyio.fail_after(5), receive:
        start = anyio.current_time()
        assert await b.next_batch() == [1]
        assert anyio.current_time() - start >= 0.04
    await send.aclose()


async def test_drop_discards_unwanted_items():
    out = await _batches(range(6), max_size=10, max_wait_s=0.0, drop=lambda i: i % 2 == 1)
    assert out == [[0, 2, 4]]


@pytest.mark.parametrize("n", [0, 1])
async def test_empty_or_single(n):
    out = await _batches(range(n), max_size=4, max_wait_s=0.0)
    assert sum(len(b) for b in out) == n
