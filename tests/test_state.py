import json
import os
import pickle

import pytest
import torch

from pyro_vae import CheckpointError, PyroVAEError, RunConfig, load_run, train
from pyro_vae.runner.state import (
    TrainingState,
    load_state,
    read_payload,
    save_state,
    write_payload,
)

from .helpers import tiny_config


def state(epoch_: int, **changes) -> TrainingState:
    fields = {"config": RunConfig().to_dict(), "epoch": epoch_, "model": {"w": torch.ones(3)},
              "optimizer": {}, "rng": {"torch": torch.get_rng_state()}, "partial": None}
    return TrainingState(**(fields | changes))


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_state(path, state(1))

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save_state(path, state(2))
    monkeypatch.undo()
    assert load_state(path).epoch == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # the temporary file is gone


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_hostile_pickle_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    write_payload(path, {"format": 1, "model": _RunsCode(str(marker))})  # a valid checksum
    with pytest.raises(CheckpointError, match="could run code"):
        load_state(path)
    with open(path, "wb") as f:  # a bare pickle: no header, never unpickled
        pickle.dump({"format": 1, "model": _RunsCode(str(marker))}, f)
    with pytest.raises(CheckpointError, match="does not begin with a pyro-vae checkpoint"):
        load_state(path)
    assert not marker.exists()


def test_a_checkpoint_without_a_checksum_still_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    save_state(path, state(3))
    legacy = read_payload(path)
    torch.save(legacy, path)  # format 1: torch.save's zip alone, as earlier versions wrote
    assert load_state(path).epoch == 3
    assert "written without a checksum" in caplog.text


def small_checkpoint() -> bytes:
    """A real checkpoint of a tiny run, as the trainer writes it (about 10 kB)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return TrainingState(RunConfig().to_dict(), 4, model.state_dict(), optimizer.state_dict(),
                         {"torch": torch.get_rng_state()[:64]}, None)


def test_every_single_byte_change_of_a_checkpoint_is_refused_as_damaged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_state(path, small_checkpoint())
    good = path.read_bytes()
    assert load_state(path).epoch == 4
    outcomes = {}
    for i in range(len(good)):
        for value in (0x00, 0xFF):
            if good[i] == value:
                continue  # no change
            path.write_bytes(good[:i] + bytes([value]) + good[i + 1:])
            try:
                load_state(path)
                outcome = "loaded"
            except CheckpointError as e:
                outcome = "damaged" if "is damaged" in str(e) else str(e)
            except Exception as e:  # noqa: BLE001 - the test counts every other outcome
                outcome = f"internal error: {type(e).__name__}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) == {"damaged"}, outcomes
    assert outcomes["damaged"] > len(good)  # nearly two variants per byte were tried


def test_a_symlinked_checkpoint_is_refused_and_its_target_unread(tmp_path):
    target = tmp_path / "elsewhere.pt"
    save_state(target, state(1))
    (tmp_path / "checkpoint.pt").symlink_to(target)
    with pytest.raises(PyroVAEError, match="symbolic link"):
        load_state(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_state(path)
    assert "\n" not in str(info.value)


def test_missing_checkpoint_and_foreign_format(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_state(tmp_path / "nope.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pyro-vae checkpoint"):
        load_state(tmp_path / "other.pt")


@pytest.mark.parametrize("damage, message", [
    ({"epoch": -1}, "epoch"),
    ({"model": {"w": "not a tensor"}}, "model"),
    ({"config": ["a", "list"]}, "config"),
    ({"rng": {}}, "RNG"),
    ({"partial": {"step": 3}}, "interrupted epoch"),
])
def test_checkpoint_contents_are_checked_before_use(tmp_path, damage, message):
    path = tmp_path / "checkpoint.pt"
    save_state(path, state(1, **damage))
    with pytest.raises(CheckpointError, match=message):
        load_state(path)


def test_checkpoint_missing_a_key_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no config, model"):
        load_state(path)


def test_checkpoint_is_readable_like_its_neighbours(tmp_path):
    save_state(tmp_path / "checkpoint.pt", state(1))
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o644


def test_checkpoint_of_another_model_is_refused_on_resume_and_load(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"]["z_dim"] = 7
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another model"):
        train(resume=tmp_path / "run", epochs=2, progress=False)
    with pytest.raises(CheckpointError, match="another model"):
        load_run(tmp_path / "run")


def test_config_round_trips_through_json():
    config = tiny_config()
    config.model.likelihood_options = {"scale": 0.2}
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
