"""A search run the way a user runs it: from their own folder, every path relative, the default
MLflow store. Ray starts each trial in a folder of its own, so nothing may depend on it."""

import mlflow
import yaml

from sora_tune.cli import main
from tests.tune.conftest import tiny_search_parameters


def test_a_search_with_relative_paths_and_the_default_store(
    local_ray, tiny_trial, tmp_path, capsys
):
    # tiny_trial's data, model and cache are relative to this folder; so are the space and the
    # Ray storage, and the MLflow store is the default one.
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"parameters": tiny_search_parameters(tiny_trial) | {"epochs": 1}})
    )
    search = ["search", "--config", "space.yaml", "--num-samples", "2"]
    code = main([*search, "--storage-path", "searches", "--name", "relative"])
    assert code == 0
    assert (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "searches" / "relative").is_dir()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    trials = [r for r in runs if r.data.tags.get("sora_tune.role") == "trial"]
    assert len(trials) == 2
    assert all(r.info.status == "FINISHED" for r in trials)
    for run in trials:  # the trials saw the user's files, by absolute path
        assert run.data.params["data_dir"] == str(tmp_path / "glue")
        assert run.data.params["model"] == str(tmp_path / "tiny-bert")
        assert run.data.params["cache_dir"] == str(tmp_path / "cache")
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
        assert "rank_pattern.json" in artifacts

    # A new search under the same name would write into this one's folder, and Optuna would
    # hand its sampler this search's trials: refused before anything starts, with the way on.
    capsys.readouterr()
    assert main([*search, "--storage-path", "searches", "--name", "relative"]) == 2
    error = capsys.readouterr().err
    assert "a search named 'relative' already ran in" in error
    assert f"--resume {tmp_path / 'searches' / 'relative'}" in error
    assert main([*search, "--storage-path", "elsewhere", "--name", "relative"]) == 2
    assert "already holds an Optuna study named 'relative'" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
