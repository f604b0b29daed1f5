"""The repository's root is pinned on a node at enrollment (`python -m agent enroll
--repo-root FILE`), checked before it is pinned, and never replaced by another."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import Repo
from tests.test_agent_package import run_agent_cli


def enroll(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    done = run_agent_cli(
        "enroll", "gw7", *args, TGP_NODE_STATE_DIR=str(tmp_path / "nodes"),
        TGP_REPO_ROOT_FILE=str(tmp_path / "pinned" / "root.json"),
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_enrollment_pins_the_root_given_and_prints_what_to_compare(tmp_path):
    repo = Repo(tmp_path / "repo", package_bytes=1024)
    code, out, err = enroll(tmp_path, "--repo-root", str(repo.root_file), "--json")
    assert code == 0, err
    pinned = json.loads(out)["repository_root"]
    assert pinned["version"] == 1
    assert pinned["sha256"] == hashlib.sha256(repo.root_file.read_bytes()).hexdigest()
    assert (tmp_path / "pinned" / "root.json").read_bytes() == repo.root_file.read_bytes()


def test_enrollment_without_a_root_says_the_node_will_refuse_downloads(tmp_path):
    code, out, _ = enroll(tmp_path)
    assert code == 0 and "No repository root is pinned" in out


def test_a_root_that_is_not_signed_tuf_root_metadata_is_refused_and_nothing_pinned(tmp_path):
    repo = Repo(tmp_path / "repo", package_bytes=1024)
    forged = json.loads(repo.root_file.read_text())
    forged["signed"]["version"] = 7  # changes what its signature covers
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    for bad in (tmp_path / "forged.json", repo.dir / "metadata" / "1.targets.json", tmp_path / "missing.json"):
        code, _, err = enroll(tmp_path, "--repo-root", str(bad))
        assert code == 2 and "--repo-root" in err, err
    assert not (tmp_path / "pinned" / "root.json").exists()


def test_another_repositorys_root_never_replaces_the_one_pinned(tmp_path):
    ours, theirs = Repo(tmp_path / "ours", package_bytes=1024), Repo(tmp_path / "theirs", package_bytes=1024)
    assert enroll(tmp_path, "--repo-root", str(ours.root_file))[0] == 0
    code, _, err = enroll(tmp_path, "--repo-root", str(theirs.root_file))
    assert code == 2 and "a different repository root is pinned already" in err
    assert (tmp_path / "pinned" / "root.json").read_bytes() == ours.root_file.read_bytes()
