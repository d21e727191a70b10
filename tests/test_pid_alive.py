"""One rule for "is that process alive": a process of another user (kill(pid, 0) → PermissionError) is alive, so a
resumed run never removes the temporary file it is writing (issue #27 item 5)."""

import os

import difffeat.spine.run
import difffeat.utils.lock


def test_a_live_process_of_another_user_keeps_its_temporary_file(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    theirs = folder / ".model.safetensors.tmp-424242"
    gone = folder / ".history.json.tmp-424243"
    theirs.write_text("in use")
    gone.write_text("left behind")

    def kill(pid, signal):
        if pid == 424242:
            raise PermissionError("another user's process")
        raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "kill", kill)
    assert difffeat.utils.lock.pid_alive(424242) and difffeat.spine.run._pid_alive(theirs.name)
    run = difffeat.spine.run.RunFolder.__new__(difffeat.spine.run.RunFolder)
    run.path = folder
    run.remove_stale_temp_files()
    assert theirs.exists() and not gone.exists()
