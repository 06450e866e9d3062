"""The wire from a Ray job back to the server: folders arrive whole and in place, and anything a cluster sends
that would damage or escape the job's folders is refused (the Ray runner's end-to-end tests are in test_cluster.py)."""

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from fts_mcp.jobs.ray.frames import (
    BadFrame,
    LineBuffer,
    Receiver,
    check_dest,
    decode,
    encode,
    relative_artifacts,
    send_tree,
)
from fts_mcp.jobs.records import ArtifactFile, Artifacts


def sent(folder: Path, dest: str) -> list[dict]:
    frames: list[dict] = []
    send_tree(frames.append, folder, dest)
    return [decode(encode(f)) for f in frames]  # through the log's text form


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_a_folder_arrives_whole_in_chunks_and_replaces_the_old_one(tmp_path):
    big = bytes(range(256)) * 1000  # several chunks
    source = make_folder(tmp_path / "cluster" / "checkpoint-4", {"adapter.safetensors": big, "sub/state.json": b"{}"})
    job = tmp_path / "job"
    make_folder(job / "checkpoints" / "checkpoint-4", {"stale.bin": b"old"})
    receiver = Receiver(job, None)
    frames = sent(source, "work/checkpoints/checkpoint-4")
    assert len(frames) > 3
    for frame in frames:
        assert receiver.feed(frame) is None
    placed = job / "checkpoints" / "checkpoint-4"
    assert (placed / "adapter.safetensors").read_bytes() == big
    assert (placed / "sub" / "state.json").read_bytes() == b"{}"
    assert not (placed / "stale.bin").exists()
    receiver.close()
    assert not (job / ".incoming").exists()


def test_the_job_folder_is_merged_entry_by_entry_and_its_own_files_are_kept(tmp_path):
    source = make_folder(tmp_path / "cluster", {"adapter/a.bin": b"a", "metrics.json": b"{}",
                                                "checkpoints/checkpoint-1/x": b"sent already"})
    job = make_folder(tmp_path / "job", {"spec.json": b"{}", "worker.log": b"lines\n",
                                         "checkpoints/checkpoint-1/x": b"x"})
    receiver = Receiver(job, None)
    frames: list[dict] = []
    send_tree(frames.append, source, "work", skip=lambda p: p == Path("checkpoints"))
    for frame in frames:
        receiver.feed(frame)
    assert (job / "adapter" / "a.bin").read_bytes() == b"a" and (job / "metrics.json").exists()
    assert (job / "worker.log").read_bytes() == b"lines\n" and (job / "checkpoints/checkpoint-1/x").read_bytes() == b"x"


def test_a_damaged_or_reordered_stream_is_refused(tmp_path):
    source = make_folder(tmp_path / "cluster", {"w.bin": bytes(200_000)})
    frames = sent(source, "work/adapter")
    damaged = [dict(f) for f in frames]
    damaged[1]["data"] = base64.b64encode(b"\x01" * 10).decode()
    receiver = Receiver(tmp_path / "job", None)
    with pytest.raises(BadFrame, match="damaged"):
        for frame in damaged:
            receiver.feed(frame)
    assert not (tmp_path / "job" / "adapter").exists()
    skipping = Receiver(tmp_path / "job2", None)
    skipping.feed(frames[0])
    with pytest.raises(BadFrame, match="out of order"):
        skipping.feed(frames[2])
    skipping.close()
    receiver.close()


@pytest.mark.parametrize("bad_id", ["0123456789ab\n", "0123456789AB", "0123456789a", 1234, None])
def test_a_folder_id_is_twelve_hex_digits_and_nothing_more(tmp_path, bad_id):
    """The id names the folder's parts in storage: a trailing newline or any other form is refused."""
    frames = sent(make_folder(tmp_path / "cluster", {"w.bin": b"x"}), "work/adapter")
    receiver = Receiver(tmp_path / "job", None)
    with pytest.raises(BadFrame, match="12 hex digits"):
        receiver.feed({**frames[0], "id": bad_id})
    receiver.close()


@pytest.mark.parametrize("dest", ["../elsewhere", "work/../../etc", "/etc/passwd", "work/spec.json",
                                  "work/worker.log", "other/x", ""])
def test_destinations_outside_the_jobs_folders_are_refused(dest):
    with pytest.raises(BadFrame):
        check_dest(dest)


def tar_frames(members: list[tarfile.TarInfo], dest: str = "work/adapter") -> list[dict]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    data = buffer.getvalue()
    return [{"t": "tree", "id": "0123456789ab", "dest": dest, "n": 0, "data": base64.b64encode(data).decode()},
            {"t": "tree_end", "id": "0123456789ab", "dest": dest, "chunks": 1, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}]


@pytest.mark.parametrize("member", ["link", "escape"])
def test_links_and_escaping_members_in_a_folder_are_refused(tmp_path, member):
    if member == "link":
        info = tarfile.TarInfo("key")
        info.type, info.linkname = tarfile.SYMTYPE, "/root/.ssh/id_rsa"
    else:
        info = tarfile.TarInfo("../../outside.txt")
        info.size = 1
    receiver = Receiver(tmp_path / "job", None)
    with pytest.raises(BadFrame):
        for frame in tar_frames([info]):
            receiver.feed(frame)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "job" / "adapter").exists()


def test_artifacts_travel_relative_and_are_checked_on_arrival(tmp_path):
    work, output = tmp_path / "cluster" / "work", tmp_path / "cluster" / "output" / "merged"
    make_folder(work / "adapter", {"a.bin": b"abc"})
    artifacts = Artifacts(adapter_dir=str(work / "adapter"), metrics=str(work / "metrics.json"),
                          output_dir=str(output), files=[ArtifactFile(path=str(work / "adapter/a.bin"), bytes=3,
                                                                      sha256=hashlib.sha256(b"abc").hexdigest())])
    wire = json.loads(json.dumps(relative_artifacts(artifacts, work, output)))
    assert wire["adapter_dir"] == "work/adapter" and wire["output_dir"] == "output"
    job, merged = tmp_path / "job", tmp_path / "models" / "merged"
    receiver = Receiver(job, merged)
    with pytest.raises(BadFrame, match="did not arrive whole"):
        receiver.artifacts(wire)
    make_folder(job / "adapter", {"a.bin": b"abd"})  # the right size, not the content the cluster hashed
    with pytest.raises(BadFrame, match="did not arrive whole"):
        receiver.artifacts(wire)
    make_folder(job / "adapter", {"a.bin": b"abc"})
    here = receiver.artifacts(wire)
    assert here.adapter_dir == str(job / "adapter") and here.output_dir == str(merged)
    assert here.files[0].path == str(job / "adapter" / "a.bin")
    with pytest.raises(BadFrame, match="outside"):
        relative_artifacts(Artifacts(adapter_dir="/etc"), work, output)


def test_log_text_in_pieces_gives_whole_lines_and_frames_are_told_from_lines():
    buffer = LineBuffer()
    line = encode({"t": "report", "figures": {"step": 3}})
    assert buffer.feed("plain li") == [] and buffer.feed("ne\n" + line[:10]) == ["plain line"]
    assert buffer.feed(line[10:]) == [line.rstrip("\n")] and buffer.flush() == []
    assert decode("plain line") is None and decode(line.rstrip("\n")) == {"t": "report", "figures": {"step": 3}}
    with pytest.raises(BadFrame):
        decode("@fts-frame {not json")


def test_compressed_streams_and_overlapping_folders_are_refused(tmp_path):
    import gzip

    plain = tar_frames([tarfile.TarInfo("a.bin")])
    data = gzip.compress(base64.b64decode(plain[0]["data"]))  # a decompression bomb would come this way
    bomb = [{**plain[0], "data": base64.b64encode(data).decode()},
            {**plain[1], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    receiver = Receiver(tmp_path / "job", None)
    with pytest.raises(BadFrame, match="not a readable tar"):
        for frame in bomb:
            receiver.feed(frame)
    receiver.feed(plain[0])
    with pytest.raises(BadFrame, match="began before"):
        receiver.feed({**plain[0], "id": "ba9876543210"})
    receiver.close()


def test_a_job_cannot_send_back_more_than_its_budget(tmp_path):
    source = make_folder(tmp_path / "cluster", {"w.bin": bytes(300_000)})
    receiver = Receiver(tmp_path / "job", None, max_bytes=200_000)
    with pytest.raises(BadFrame, match="more than the server accepts"):
        for frame in sent(source, "work/adapter"):
            receiver.feed(frame)
    receiver.close()
    assert not (tmp_path / "job" / "adapter").exists()


def test_an_endless_line_is_cut_and_a_frame_that_long_is_refused():
    from fts_mcp.jobs.ray.frames import LINE_LIMIT

    buffer = LineBuffer()
    lines = buffer.feed("@fts-frame " + "x" * (LINE_LIMIT + 10))
    assert len(lines) == 1 and len(lines[0]) == LINE_LIMIT
    with pytest.raises(BadFrame):
        decode(lines[0])


def test_a_folder_can_travel_through_storage_and_is_checked_and_removed_there(tmp_path):
    from fts_mcp.jobs.ray.frames import Storage

    source = make_folder(tmp_path / "cluster" / "merged", {"model.safetensors": bytes(range(256)) * 4000})
    shared = tmp_path / "bucket"
    frames: list[dict] = []
    send_tree(frames.append, source, "output", storage=Storage(str(shared), "fts-job-1"))
    assert [f["t"] for f in frames] == ["tree_ref"] and "data" not in frames[0]  # the log carries a reference
    assert len(list((shared / "fts-job-1").iterdir())) == 1
    receiver = Receiver(tmp_path / "job", tmp_path / "models" / "merged", storage=Storage(str(shared), "fts-job-1"))
    receiver.feed(frames[0])
    placed = tmp_path / "models" / "merged" / "model.safetensors"
    assert placed.read_bytes() == (source / "model.safetensors").read_bytes()
    assert not list((shared / "fts-job-1").iterdir())  # fetched, then deleted

    send_tree(frames.append, source, "output", storage=Storage(str(shared), "fts-job-1"))
    (object_,) = (shared / "fts-job-1").iterdir()
    object_.write_bytes(object_.read_bytes()[:-1] + b"\x01")  # changed in storage
    with pytest.raises(BadFrame, match="damaged"):
        receiver.feed(frames[-1])
    with pytest.raises(BadFrame, match="no FTS_RAY_STORAGE"):
        Receiver(tmp_path / "job", None).feed(frames[-1])
    small = Receiver(tmp_path / "job", None, max_bytes=1000, storage=Storage(str(shared), "fts-job-1"))
    with pytest.raises(BadFrame, match="more than the server accepts"):
        small.feed(frames[-1])
