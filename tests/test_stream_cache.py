"""The on-disk cache of request streams (moesim.simulator.stream_cache): a hit replays exactly what a
fresh build replays without reading the rows; a changed file, a corrupt or truncated entry and
concurrent writers are all handled; --no-cache / MOESIM_NO_CACHE write nothing; nothing is written
beside the user's trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moesim.simulator import replay, stream_cache
from moesim.simulator.replay import simulate
from moesim.traces.format import TraceMeta, TraceWriter, read_trace
from moesim.traces.synth import load_preset, synthesize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(d))
    monkeypatch.delenv("MOESIM_NO_CACHE", raising=False)
    return d


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("sc") / "t.parquet"
    synthesize(load_preset("mixtral-8x7b"), 300, 3, path, progress=False)
    return path


def _entries(cache_dir: Path) -> list[Path]:
    d = cache_dir / "streams"
    return sorted(d.glob("*.stream")) if d.is_dir() else []


def _result(trace, policy, k, **kw):
    r = simulate(trace, policy, k, **kw)
    return r.requests, r.hits, r.layer_requests.tolist(), r.layer_hits.tolist()


CASES = [("lru", 4, "layer", "atomic"), ("arc", 3, "layer", "sequential"), ("lfu", 40, "global", "atomic"),
         ("fifo", 64, "global", "sequential"), ("gate-weighted", 4, "layer", "atomic")]


@pytest.mark.parametrize("policy,k,scope,semantics", CASES)
def test_hit_replays_what_a_fresh_build_replays_without_reading_rows(synth, cache_dir, policy, k, scope, semantics):
    want = _result(read_trace(synth), policy, k, scope=scope, semantics=semantics)
    first = read_trace(synth, lazy=True, replay_cache=True)
    assert _result(first, policy, k, scope=scope, semantics=semantics) == want
    assert len(_entries(cache_dir)) == 1
    second = read_trace(synth, lazy=True, replay_cache=True)
    assert _result(second, policy, k, scope=scope, semantics=semantics) == want
    # the hit never read the replay's rows (gate-weighted reads the weights, and so the rows)
    assert (second._pending is not None) == (policy != "gate-weighted")
    # and the arrays equal a fresh build's, dtype and all
    built = replay._stream_arrays(read_trace(synth), scope, semantics)
    cached = replay._stream_arrays(read_trace(synth, lazy=True, replay_cache=True), scope, semantics)
    for a, b in zip(built[:4], cached[:4], strict=True):
        assert a.dtype == b.dtype == np.int64 and a.shape == b.shape and np.array_equal(a, b)
    assert built[6] == cached[6]


def test_unordered_file_with_weights(tmp_path, cache_dir):
    """A file not in execution order: the cached stream is the sorted one, and the weights a policy reads
    on a hit are sorted the same way."""
    path = tmp_path / "u.parquet"
    meta = TraceMeta(model="m", family="f", num_layers=2, num_experts=4, top_k=2)
    rng = np.random.default_rng(0)
    n = 60
    rows = [(s, t, layer) for s in range(2) for t in range(15) for layer in range(2)]
    order = rng.permutation(n)
    ex = np.array([rng.choice(4, 2, replace=False) for _ in range(n)])
    w = rng.random((n, 2)).astype(np.float16)
    with TraceWriter(path, meta) as wr:
        for i in order:
            s, t, layer = rows[i]
            wr.write(s, [t], 1, [layer], ex[i:i + 1], w[i:i + 1])
    want = _result(read_trace(path), "gate-weighted", 2)
    assert _result(read_trace(path, lazy=True, replay_cache=True), "gate-weighted", 2) == want
    hit = read_trace(path, lazy=True, replay_cache=True)
    assert _result(hit, "gate-weighted", 2) == want
    assert not hit.is_execution_ordered()
    assert _result(read_trace(path, lazy=True, replay_cache=True), "lru", 2) == _result(read_trace(path), "lru", 2)


def test_changed_file_is_a_miss(tmp_path, cache_dir):
    """Another trace written under the same name -- even with the old modification time put back -- is
    never replayed from the old entry; the old entry is replaced, not kept beside the new one."""
    path = tmp_path / "t.parquet"
    synthesize(load_preset("mixtral-8x7b"), 200, 1, path, progress=False)
    old = _result(read_trace(path, lazy=True, replay_cache=True), "lru", 4)
    assert _result(read_trace(path, lazy=True, replay_cache=True), "lru", 4) == old
    st = os.stat(path)
    other = tmp_path / "other.parquet"
    synthesize(load_preset("mixtral-8x7b"), 200, 2, other, progress=False)
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    want = _result(read_trace(path), "lru", 4)
    assert want != old
    t = read_trace(path, lazy=True, replay_cache=True)
    assert _result(t, "lru", 4) == want
    assert t._pending is None  # a miss: the rows were read
    assert len(_entries(cache_dir)) == 1
    assert _result(read_trace(path, lazy=True, replay_cache=True), "lru", 4) == want


def test_identity_sees_size_mtime_and_footer(tmp_path):
    from moesim.traces.format import file_identity

    path = tmp_path / "t.parquet"
    synthesize(load_preset("mixtral-8x7b"), 50, 1, path, progress=False)
    base = file_identity([path])
    assert file_identity([path]) == base
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert file_identity([path]) != base
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_identity([path]) == base
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the footer; same size, same inode, same time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_identity([path]) != base


def _corrupt_data(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _garbage_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[20:30] = b"#" * 10
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _other_entry(p: Path) -> None:
    """A whole, consistent entry -- of another file (its header names another entry)."""
    data = p.read_bytes()
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16:16 + n])
    header["name"] = "0" * 16 + "-" + "1" * 32 + ".stream"
    raw = json.dumps(header).encode()
    assert len(raw) == n
    p.write_bytes(data[:16] + raw + data[16 + n:])


@pytest.mark.parametrize("damage", [_corrupt_data, _truncate, _garbage_header, _empty, _other_entry])
def test_corrupt_entry_is_detected_and_rebuilt(synth, cache_dir, damage):
    want = _result(read_trace(synth), "lru", 4)
    _result(read_trace(synth, lazy=True, replay_cache=True), "lru", 4)
    (entry,) = _entries(cache_dir)
    damage(entry)
    t = read_trace(synth, lazy=True, replay_cache=True)
    assert _result(t, "lru", 4) == want
    assert t._pending is None  # rebuilt from the rows
    (again,) = _entries(cache_dir)
    assert again == entry and stream_cache.load(entry) is not None


def test_concurrent_writers_and_readers(synth, cache_dir):
    """Writers rename complete files; a reader sees no entry or a whole one, never a partial file."""
    t = read_trace(synth)
    arrays = dict(zip(("cache", "keys", "clock"), replay._stream_arrays(t, "layer", "atomic")[:3], strict=True))
    path = stream_cache.entry_path(str(synth), "x" * 64, t.meta.to_json(), "layer", "atomic")
    seen: list[object] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            got = stream_cache.load(path)
            seen.append(None if got is None else all(np.array_equal(got[0][n], arrays[n]) for n in arrays))

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=stream_cache.store, args=(path, arrays, {"n_keys": 8, "ordered": True}))
               for _ in range(4)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in readers:
        th.join()
    assert False not in seen
    got = stream_cache.load(path)
    assert got is not None and all(np.array_equal(got[0][n], arrays[n]) for n in arrays)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_unwritable_cache_dir_still_replays(synth, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(blocker))
    want = _result(read_trace(synth), "lru", 4)
    assert _result(read_trace(synth, lazy=True, replay_cache=True), "lru", 4) == want


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MOESIM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert stream_cache.cache_root() == tmp_path / "xdg" / "moesim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert stream_cache.cache_root() == tmp_path / "home" / ".cache" / "moesim"


def _three_files(tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"t{seed}.parquet"
        synthesize(load_preset("mixtral-8x7b"), 120, seed, path, progress=False)
        paths.append(path)
    return paths


def test_size_bound_removes_the_least_recently_used_entries(tmp_path, cache_dir, monkeypatch):
    a, b, c = _three_files(tmp_path)
    simulate(read_trace(a, lazy=True, replay_cache=True), "lru", 4)
    [entry_a] = _entries(cache_dir)
    simulate(read_trace(b, lazy=True, replay_cache=True), "lru", 4)
    [entry_b] = [p for p in _entries(cache_dir) if p != entry_a]
    os.utime(entry_a, ns=(0, 0))  # both long ago, a's first; then a hit marks a's used now
    os.utime(entry_b, ns=(10**9, 10**9))
    simulate(read_trace(a, lazy=True, replay_cache=True), "lru", 4)
    assert entry_a.stat().st_mtime_ns > 10**9
    # room for about two entries: writing c's removes b's (the least recently used), keeps a's
    monkeypatch.setenv("MOESIM_CACHE_MAX_GB", str(2.5 * entry_a.stat().st_size / 2**30))
    simulate(read_trace(c, lazy=True, replay_cache=True), "lru", 4)
    after = _entries(cache_dir)
    assert entry_a in after and entry_b not in after and len(after) == 2
    # a bound below one entry keeps only the one just written
    monkeypatch.setenv("MOESIM_CACHE_MAX_GB", "0")
    simulate(read_trace(b, lazy=True, replay_cache=True), "lru", 4)
    assert _entries(cache_dir) == [entry_b]


def test_default_size_bound_and_bad_values(monkeypatch):
    monkeypatch.delenv("MOESIM_CACHE_MAX_GB", raising=False)
    assert stream_cache.max_bytes() == 16 * 2**30
    monkeypatch.setenv("MOESIM_CACHE_MAX_GB", "0.5")
    assert stream_cache.max_bytes() == 2**29
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("MOESIM_CACHE_MAX_GB", bad)
        with pytest.raises(stream_cache.UsageError, match="MOESIM_CACHE_MAX_GB"):
            stream_cache.max_bytes()


def test_cli_reports_a_bad_size_bound_in_one_line(tmp_path):
    trace = tmp_path / "t.parquet"
    synthesize(load_preset("mixtral-8x7b"), 50, 0, trace, progress=False)
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "moesim", "simulate", str(trace), "--policy", "lru", "--cache-size", "4"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "MOESIM_CACHE_DIR": str(cache),
                            "MOESIM_CACHE_MAX_GB": "ten"})
    assert r.returncode == 2 and "MOESIM_CACHE_MAX_GB" in r.stderr and "'ten'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not cache.exists()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO)


def test_cli_uses_the_cache_and_no_cache_writes_nothing(tmp_path):
    trace_dir = tmp_path / "traces"
    trace_dir.mkdir()
    trace = trace_dir / "t.parquet"
    synthesize(load_preset("mixtral-8x7b"), 100, 0, trace, progress=False)
    cache = tmp_path / "cache"
    args = ("simulate", str(trace), "--policy", "lru", "--cache-size", "4", "--json")
    off = _cli(*args, "--no-cache", env={"MOESIM_CACHE_DIR": str(cache)})
    assert not cache.exists()
    env_off = _cli(*args, env={"MOESIM_CACHE_DIR": str(cache), "MOESIM_NO_CACHE": "1"})
    assert not cache.exists()
    miss = _cli(*args, env={"MOESIM_CACHE_DIR": str(cache)})
    assert len(_entries(cache)) == 1
    hit = _cli(*args, env={"MOESIM_CACHE_DIR": str(cache)})
    assert json.loads(off.stdout) == json.loads(env_off.stdout) == json.loads(miss.stdout) == json.loads(hit.stdout)
    mrc_args = ("mrc", str(trace), "--policy", "lru", "--json")
    assert json.loads(_cli(*mrc_args, env={"MOESIM_CACHE_DIR": str(cache)}).stdout) == \
        json.loads(_cli(*mrc_args, "--no-cache", env={"MOESIM_CACHE_DIR": str(cache)}).stdout)
    assert [p.name for p in trace_dir.iterdir()] == ["t.parquet"]  # nothing beside the user's file


def test_bad_file_is_still_reported_with_the_cache_on(tmp_path, cache_dir):
    path = tmp_path / "bad.parquet"
    meta = TraceMeta(model="m", family="f", num_layers=2, num_experts=4, top_k=2)
    with TraceWriter(path, meta) as w:
        w.write(0, [0, 0], 1, [0, 1], [[0, 1], [2, 9]], [[0.5, 0.5]] * 2)
    r = subprocess.run([sys.executable, "-m", "moesim", "simulate", str(path), "--policy", "lru", "--cache-size", "2"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert r.returncode == 1 and "expert id 9 out of range" in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr and not _entries(cache_dir)


def test_pending_trace_reads_rows_for_everything_else(synth, cache_dir):
    """A trace whose rows are deferred behaves like an eagerly read one for every other use."""
    eager = read_trace(synth)
    t = read_trace(synth, lazy=True, replay_cache=True)
    assert len(t) == len(eager) and t._pending is not None
    assert t.column_names == eager.column_names
    assert np.array_equal(t.experts, eager.experts) and t._pending is None
    assert pq.ParquetFile(synth).metadata.num_rows == len(t)


def test_threads_reading_deferred_rows_at_once(synth, cache_dir):
    """Threads that first use a deferred trace together (mrc's per-size runs reading the weights) all
    see the whole rows: one reads them, the others wait."""
    eager = read_trace(synth)
    t = read_trace(synth, lazy=True, replay_cache=True)
    start = threading.Barrier(6)
    got: list[object] = []

    def use() -> None:
        start.wait()
        try:
            got.append(bool(np.array_equal(t.weights, eager.weights) and np.array_equal(t.layer, eager.layer)))
        except Exception as exc:  # noqa: BLE001 - any failure of a racing reader is the finding
            got.append(exc)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == [True] * 6


@pytest.mark.parametrize("hit", [False, True])
def test_cached_trace_is_freed_without_the_cycle_collector(synth, cache_dir, hit):
    import gc
    import weakref

    if hit:
        simulate(read_trace(synth, lazy=True, replay_cache=True), "lru", 4)
    was = gc.isenabled()
    gc.disable()
    try:
        t = read_trace(synth, lazy=True, replay_cache=True)
        simulate(t, "gate-weighted", 2)  # the stream (built or mapped) and the weights
        ref = weakref.ref(t)
        del t
        assert ref() is None
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("policy,k,scope,semantics", [("lru", 4, "layer", "atomic"), ("opt", 64, "global", "sequential")])
def test_real_trace_hit_equals_build(real_trace_path, cache_dir, policy, k, scope, semantics):
    want = _result(read_trace(real_trace_path), policy, k, scope=scope, semantics=semantics)
    for _ in range(2):  # a miss, then a hit
        t = read_trace(real_trace_path, lazy=True, replay_cache=True)
        assert _result(t, policy, k, scope=scope, semantics=semantics) == want
    assert t._pending is not None


def test_checksum_catches_a_changed_word_and_two_swapped_words(tmp_path):
    """The entry's checksum is position-sensitive (its docstring's promise): swapping two different
    words of an array, which keeps a plain sum, makes the entry corrupt; so does changing one word."""
    arrays = {"a": np.arange(40, dtype=np.int64) * 7 + 3, "b": np.array([[5, -1], [9, 2]], np.int64)}
    for damage in ("swap", "change"):
        path = tmp_path / f"{damage}.stream"
        assert stream_cache.store(path, arrays, {"k": 1})
        loaded = stream_cache.load(path)
        assert loaded is not None and np.array_equal(loaded[0]["a"], arrays["a"])
        del loaded
        data = bytearray(path.read_bytes())
        words = arrays["a"].tobytes()
        at = data.find(words)   # array "a" as written, found by its bytes (independent of the layout code)
        assert at > 0 and data.find(words, at + 1) < 0
        w = 8
        if damage == "swap":     # words 3 and 11 trade places: same sum, same set of values
            data[at + 3 * w:at + 4 * w], data[at + 11 * w:at + 12 * w] = words[11 * w:12 * w], words[3 * w:4 * w]
        else:
            data[at + 5 * w] ^= 0x01
        path.write_bytes(bytes(data))
        assert stream_cache.load(path) is None, damage
        assert not path.exists()   # a corrupt entry is deleted
