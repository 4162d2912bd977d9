"""``resilient inspect`` and ``resilient export`` (as the functions the CLI calls)."""

from __future__ import annotations

import io
import os

import torch
from persist_helpers import flip_byte, make_shards, truncate_manifest
from safetensors.torch import load_file

from resilient.cli_persist import export_main, inspect_main
from resilient.persist import ShardState, open_storage, write_checkpoint


def _model_checkpoint(ckpt_dir, step=7):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors["optimizer/state/0/exp_avg"] = torch.ones(4, 8)
    shards = {r: ShardState(step, 1, b"meta", dict(tensors)) for r in range(2)}
    write_checkpoint(open_storage(ckpt_dir), step, 1, 2, shards, job="j")
    return model


def test_inspect_prints_the_manifest_and_verifies(ckpt_dir, capsys):
    write_checkpoint(open_storage(ckpt_dir), 12, 3, 2, make_shards(12), job="demo")
    out = io.StringIO()
    assert inspect_main([os.path.join(ckpt_dir, "step-00000012"), "--tensors"], out=out) == 0
    text = out.getvalue()
    assert "step 12" in text and "generation 3" in text and "world size 2" in text and "job demo" in text
    assert "rank-0.safetensors" in text and "rank-1.safetensors" in text and "model/layer.weight" in text
    size = os.path.getsize(os.path.join(ckpt_dir, "step-00000012", "rank-0.safetensors"))
    assert str(size) in text
    assert "verified" in text


def test_inspect_exits_1_naming_the_corrupt_file_and_tensor(ckpt_dir, capsys):
    write_checkpoint(open_storage(ckpt_dir), 1, 1, 2, make_shards(1), job="j")
    write_checkpoint(open_storage(ckpt_dir), 2, 1, 2, make_shards(2), job="j")
    flip_byte(os.path.join(ckpt_dir, "step-00000002", "rank-1.safetensors"), offset_from_end=1, mask=0x80)
    out = io.StringIO()
    assert inspect_main([ckpt_dir], out=out) == 1
    err = capsys.readouterr().err
    assert "step 2" in err and "rank-1.safetensors" in err and "crc32" in err
    assert "step 1" in out.getvalue()  # the healthy one is listed too
    assert inspect_main([os.path.join(ckpt_dir, "step-00000001")], out=io.StringIO()) == 0


def test_inspect_reports_partial_without_failing_and_json_prints_the_manifest(ckpt_dir):
    write_checkpoint(open_storage(ckpt_dir), 1, 1, 2, make_shards(1), job="j")
    os.makedirs(os.path.join(ckpt_dir, "step-00000002"))
    out = io.StringIO()
    assert inspect_main([ckpt_dir], out=out) == 0
    assert "partial" in out.getvalue()
    out = io.StringIO()
    assert inspect_main([os.path.join(ckpt_dir, "step-00000001", "manifest.json"), "--json"], out=out) == 0
    assert '"world_size": 2' in out.getvalue()


def test_inspect_of_a_missing_path_says_it_does_not_exist_and_an_empty_one_that_it_has_no_checkpoint(
        tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert inspect_main([missing], out=io.StringIO()) == 1
    assert f"{missing} does not exist" in capsys.readouterr().err
    assert export_main([missing, str(tmp_path / "x.pt")], out=io.StringIO()) == 1
    assert f"{missing} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert inspect_main([str(tmp_path / "empty")], out=io.StringIO()) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_export_only_model_gives_a_state_dict_that_load_state_dict_accepts(ckpt_dir, tmp_path):
    model = _model_checkpoint(ckpt_dir)
    out_pt = str(tmp_path / "model.pt")
    assert export_main([ckpt_dir, out_pt, "--only", "model", "--rank", "1"], out=io.StringIO()) == 0
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fresh.load_state_dict(torch.load(out_pt, weights_only=True), strict=True)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)

    out_st = str(tmp_path / "model.safetensors")
    assert export_main([os.path.join(ckpt_dir, "step-00000007"), out_st, "--only", "model"], out=io.StringIO()) == 0
    plain = load_file(out_st)
    assert set(plain) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.equal(plain["2.bias"], model.state_dict()["2.bias"])


def test_export_without_only_keeps_every_key_in_the_chosen_format(ckpt_dir, tmp_path):
    _model_checkpoint(ckpt_dir)
    out = str(tmp_path / "all.bin")
    assert export_main([ckpt_dir, out, "--format", "safetensors"], out=io.StringIO()) == 0
    assert "optimizer/state/0/exp_avg" in load_file(out)


def test_export_errors_exit_1_with_a_message(ckpt_dir, tmp_path, capsys):
    _model_checkpoint(ckpt_dir)
    assert export_main([ckpt_dir, str(tmp_path / "x.pt"), "--only", "nope"], out=io.StringIO()) == 1
    assert "['model', 'optimizer']" in capsys.readouterr().err
    assert export_main([ckpt_dir, str(tmp_path / "x.pt"), "--rank", "5"], out=io.StringIO()) == 1
    assert "--rank 5" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), str(tmp_path / "x.pt")], out=io.StringIO()) == 1
    assert "No complete checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.pt")


def _digest_tree(path):
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[full] = open(full, "rb").read()
    return out


def test_export_refuses_an_output_inside_the_persist_directory_it_reads(ckpt_dir, tmp_path, capsys):
    """The review's case: OUT = a shard file of the checkpoint being read returned 0 and destroyed it."""
    _model_checkpoint(ckpt_dir, step=12)
    _model_checkpoint(ckpt_dir, step=13)
    before = _digest_tree(ckpt_dir)
    shard = os.path.join(ckpt_dir, "step-00000012", "rank-0.safetensors")
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "out.safetensors").symlink_to(shard)  # resolves into the checkpoint
    (link_dir / "ckpt").symlink_to(ckpt_dir, target_is_directory=True)
    cases = [
        [ckpt_dir, shard, "--force"],
        [os.path.join(ckpt_dir, "step-00000012"), shard, "--force"],
        [os.path.join(ckpt_dir, "step-00000012"), os.path.join(ckpt_dir, "step-00000013", "rank-1.safetensors"),
         "--force"],  # another checkpoint of the same persist directory
        [ckpt_dir, os.path.join(ckpt_dir, "new.pt")],
        [ckpt_dir, str(link_dir / "out.safetensors"), "--force"],
        [str(link_dir / "ckpt"), os.path.join(ckpt_dir, "step-00000012", "x.pt")],
    ]
    for argv in cases:
        assert export_main(argv, out=io.StringIO()) == 2, argv
        err = capsys.readouterr().err
        assert "is inside the persist directory" in err and os.path.realpath(ckpt_dir) in err, err
    assert _digest_tree(ckpt_dir) == before
    assert inspect_main([ckpt_dir], out=io.StringIO()) == 0


def test_export_replaces_an_existing_output_only_with_force(ckpt_dir, tmp_path, capsys):
    _model_checkpoint(ckpt_dir)
    out = tmp_path / "model.pt"
    out.write_bytes(b"precious")
    assert export_main([ckpt_dir, str(out), "--only", "model"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert f"The output {out} exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    assert export_main([ckpt_dir, str(tmp_path), "--force"], out=io.StringIO()) == 2
    assert "is a directory" in capsys.readouterr().err
    assert export_main([ckpt_dir, str(out), "--only", "model", "--force"], out=io.StringIO()) == 0
    assert set(torch.load(str(out), weights_only=True)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_export_of_a_persist_directory_refuses_a_damaged_newest_checkpoint_and_names_the_older_one(
        ckpt_dir, tmp_path, capsys):
    _model_checkpoint(ckpt_dir, step=5)
    _model_checkpoint(ckpt_dir, step=12)
    truncate_manifest(ckpt_dir, 12)
    out = str(tmp_path / "model.pt")
    assert export_main([ckpt_dir, out], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "newest checkpoint" in err and "step 12" in err and "is damaged" in err and "Nothing was exported" in err
    assert f"resilient export {os.path.join(ckpt_dir, 'step-00000005')} {out}" in err
    assert not os.path.exists(out)
    # named explicitly, the older one exports, and the output says which step it is
    said = io.StringIO()
    assert export_main([os.path.join(ckpt_dir, "step-00000005"), out], out=said) == 0
    assert "step 5" in said.getvalue()


def test_export_of_a_persist_directory_refuses_a_newest_checkpoint_that_fails_its_crc32(ckpt_dir, tmp_path, capsys):
    _model_checkpoint(ckpt_dir, step=5)
    _model_checkpoint(ckpt_dir, step=12)
    flip_byte(os.path.join(ckpt_dir, "step-00000012", "rank-0.safetensors"), offset_from_end=3, mask=0x10)
    out = str(tmp_path / "all.safetensors")
    assert export_main([ckpt_dir, out], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "step 12" in err and "crc32" in err and "step-00000005" in err
    assert not os.path.exists(out)


def test_inspect_json_of_a_persist_directory_lists_every_checkpoint_with_its_status(ckpt_dir, capsys):
    import json

    write_checkpoint(open_storage(ckpt_dir), 1, 1, 2, make_shards(1), job="j")
    write_checkpoint(open_storage(ckpt_dir), 2, 1, 2, make_shards(2), job="j")
    os.makedirs(os.path.join(ckpt_dir, "step-00000003"))
    truncate_manifest(ckpt_dir, 2)
    out = io.StringIO()
    assert inspect_main([ckpt_dir, "--json"], out=out) == 1
    listed = json.loads(out.getvalue())
    assert [(e["step"], e["status"]) for e in listed] == [(1, "verified"), (2, "corrupt"), (3, "partial")]
    assert listed[0]["manifest"]["world_size"] == 2 and listed[1]["manifest"] is None
    assert "not valid JSON" in listed[1]["error"]
    assert "step 2" in capsys.readouterr().err
    out = io.StringIO()
    assert inspect_main([os.path.join(ckpt_dir, "step-00000001"), "--json"], out=out) == 0
    assert json.loads(out.getvalue())["step"] == 1


def test_inspect_lists_checkpoints_a_job_set_aside(ckpt_dir):
    from resilient.persist import set_aside

    write_checkpoint(open_storage(ckpt_dir), 1, 1, 2, make_shards(1), job="j")
    write_checkpoint(open_storage(ckpt_dir), 2, 1, 2, make_shards(2), job="j")
    moved = set_aside(open_storage(ckpt_dir), "step-00000002", "Test.", step=2)
    out = io.StringIO()
    assert inspect_main([ckpt_dir], out=out) == 0
    assert f"set aside: {moved}" in out.getvalue()
    out = io.StringIO()
    assert inspect_main([moved], out=out) == 0, "a set-aside checkpoint can be inspected by naming it"
    assert f"checkpoint {moved}" in out.getvalue() and "step 2" in out.getvalue()
