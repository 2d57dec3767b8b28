"""Job spec validation: same object from YAML and Python, strict errors naming the field."""

from __future__ import annotations

import textwrap

import pytest

from gateway.errors import SpecError
from gateway.spec import JobSpec, load_spec, parse_spec

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"registry.example/lab/train:1.0@{DIGEST}"


def spec(**fields):
    base = {"name": "train", "command": ["python", "-m", "kernels.apps.train"]}
    base.update(fields)
    return parse_spec(base)


def issues(data, **kw):
    with pytest.raises(SpecError) as info:
        parse_spec(data, **kw)
    return {i.path: i.message for i in info.value.issues}


def test_yaml_and_python_give_the_same_frozen_spec(tmp_path):
    (tmp_path / "data.csv").write_text("x\n1\n")
    (tmp_path / "job.yaml").write_text(textwrap.dedent(f"""
        name: train
        image: {IMAGE}
        command: [python, -m, kernels.apps.train]
        env: {{SEED: 3, FLAG: true}}
        resources: {{nodes: 2, tasks_per_node: 2, memory: 4G, walltime: "01:30:00", gpus: {{count: 1, type: a100}}}}
        inputs: [data.csv]
        outputs: ["out/*.json"]
        target: slurm:gpu
        labels: {{project: x}}
    """))
    from_yaml = load_spec(tmp_path / "job.yaml")
    from_python = parse_spec({
        "name": "train", "image": IMAGE, "command": ["python", "-m", "kernels.apps.train"],
        "env": {"SEED": "3", "FLAG": "true"},
        "resources": {"nodes": 2, "tasks_per_node": 2, "memory": "4096M", "walltime": "90m",
                      "gpus": {"count": 1, "type": "a100"}},
        "inputs": [str(tmp_path / "data.csv")], "outputs": ["out/*.json"], "target": "slurm:gpu",
        "labels": {"project": "x"}})
    assert from_yaml == from_python
    assert from_yaml.spec_digest == from_python.spec_digest
    assert from_yaml.resources.memory == 4 << 30 and from_yaml.resources.walltime == 5400
    with pytest.raises(Exception):
        from_yaml.name = "other"  # frozen


def test_canonical_json_round_trips_to_the_same_digest():
    original = spec(env={"B": "2", "A": "1"}, resources={"memory": "1G", "walltime": "10m"})
    again = JobSpec.model_validate_json(original.canonical_json(),
                                        context={"canonical": True, "check_inputs": False})
    assert again.spec_digest == original.spec_digest
    assert spec(env={"A": "1", "B": "2"}, resources={"memory": "1024M", "walltime": "600s"}
                ).spec_digest == original.spec_digest
    assert spec(env={"A": "1"}).spec_digest != original.spec_digest


def test_unknown_keys_are_refused_with_the_valid_ones():
    found = issues({"name": "a", "command": "true", "comand": "x", "resources": {"cpu": 2}})
    assert "valid keys here are: command, env" in found["comand"]
    assert "cpus_per_task" in found["resources.cpu"]


def test_tag_only_image_is_refused_with_how_to_pin():
    found = issues({"name": "a", "command": "true", "image": "python:3.11"})
    assert "hpcgw image pin python:3.11" in found["image"]
    assert spec(image=IMAGE).image == IMAGE


@pytest.mark.parametrize("field, value, where", [
    ("resources", {"nodes": 0}, "resources.nodes"),
    ("resources", {"cpus_per_task": 100000}, "resources.cpus_per_task"),
    ("resources", {"memory": "4"}, "resources.memory"),
    ("resources", {"memory": 4096}, "resources.memory"),
    ("resources", {"walltime": 90}, "resources.walltime"),
    ("resources", {"walltime": "ninety"}, "resources.walltime"),
    ("resources", {"gpus": {"count": -1}}, "resources.gpus.count"),
    ("command", [], "command"),
    ("command", "   ", "command"),
    ("command", ["", "x"], "command"),
    ("env", {"1BAD": "x"}, "env"),
    ("env", {"HPCGW_JOB_ID": "x"}, "env"),
    ("target", "kubernetes", "target"),
    ("retries", {"max": 99}, "retries.max"),
    ("outputs", ["../escape"], "outputs"),
    ("workdir", "relative/dir", "workdir"),
    ("requires", ["ib; rm -rf /"], "requires"),
    ("inputs", ["/definitely/not/here.csv"], "inputs"),
])
def test_bad_values_name_their_field(field, value, where):
    found = issues({"name": "a", "command": "true", field: value})
    assert where in found, found


@pytest.mark.parametrize("name", ["a b", "a'; echo foo", "a\n0", "$(rm -rf /)", "", "-x", "a" * 64])
def test_hostile_names_are_refused(name):
    assert "name" in issues({"name": name, "command": "true"})


@pytest.mark.parametrize("value", ["a 0", "a'; echo foo", "a\n0", "$(rm -rf /)", '"; rm -rf ~ #'])
def test_hostile_values_are_kept_byte_exact_where_they_are_data(value):
    job = spec(command=["echo", value], env={"X": value}, labels={"k": value})
    assert job.argv == ["echo", value]
    assert job.env["X"] == value and job.labels["k"] == value


def test_script_command_runs_under_sh():
    assert spec(command="echo hi && exit 3").argv == ["/bin/sh", "-c", "echo hi && exit 3"]


def test_missing_input_named_and_relative_inputs_resolve_from_spec_folder(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "job.yaml").write_text("name: a\ncommand: 'true'\ninputs: [in.txt, {source: in.txt, target: b/c.txt}]\n")
    job = load_spec(tmp_path / "job.yaml")
    assert [i.source for i in job.inputs] == [str(tmp_path / "in.txt")] * 2
    assert [i.name for i in job.inputs] == ["in.txt", "b/c.txt"]
    (tmp_path / "job2.yaml").write_text("name: a\ncommand: 'true'\ninputs: [gone.txt]\n")
    with pytest.raises(SpecError, match="gone.txt"):
        load_spec(tmp_path / "job2.yaml")


def test_malformed_and_duplicate_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ncommand: [x\n")
    with pytest.raises(SpecError, match="malformed YAML at line"):
        load_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("name: a\nname: b\ncommand: x\n")
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        load_spec(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "c.yaml")


def test_runtime_and_image_must_agree():
    assert "" in issues({"name": "a", "command": "x", "runtime": "podman"})
    assert spec().effective_runtime == "host"
    assert spec(image=IMAGE).effective_runtime is None


def test_yaml_booleans_follow_yaml_1_2_so_retries_on_works(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "name: a\ncommand: x\nretries: {max: 1, on: [failed, timeout]}\nenv: {ANSWER: no}\n")
    job = load_spec(tmp_path / "r.yaml")
    assert job.retries.on == ("failed", "timeout")
    assert job.env["ANSWER"] == "no"
