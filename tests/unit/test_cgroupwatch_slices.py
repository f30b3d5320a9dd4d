"""CgroupWatch hands emptied skills to the daemon for SLICE_S per loop
turn, so a mass exit does not hold the event loop (pure logic on a real
asyncio loop; the clock is the test's)."""
import asyncio

from agent.daemon import cgroupwatch


def test_a_mass_exit_is_handled_a_slice_per_turn(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(cgroupwatch.time, "monotonic", lambda: now[0])
    seen: list[str] = []

    def end(skill_id: str) -> None:  # each skill costs a third of a slice
        seen.append(skill_id)
        now[0] += cgroupwatch.SLICE_S / 3

    loop = asyncio.new_event_loop()
    try:
        watch = cgroupwatch.CgroupWatch(loop, end)
        ids = [f"r-{i}" for i in range(10)]
        watch.enqueue(ids + ids[:4])  # repeats in one read are one change
        assert seen == ids[:3]
        turns = 0
        while len(seen) < len(ids) and turns < 10:
            loop.call_soon(loop.stop)  # run_forever() then runs one turn: what was ready, and stops
            loop.run_forever()
            turns += 1
            assert len(seen) == min(len(ids), 3 * (turns + 1))
        assert seen == ids  # each once, in arrival order
        assert turns == 3
        watch.enqueue(["r-late"])  # nothing pending: handled at once
        assert seen[-1] == "r-late"
        watch.close()
    finally:
        loop.close()
