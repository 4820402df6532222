"""The job flags shared by serve and batch become validated configs."""

from __future__ import annotations

import argparse

import pytest

from preble_hpc.cli_args import add_job_args, job_config_from_args
from preble_hpc.config import ConfigError, SchedulerConfig


def _job(*argv: str):
    parser = argparse.ArgumentParser()
    add_job_args(parser)
    return job_config_from_args(parser.parse_args(["--model", "m", *argv]))


def test_scheduler_flags_reach_the_scheduler_config_and_the_rest_keep_defaults():
    job = _job("--new-prefix-slack", "0.5", "--rebalance-ratio", "2")
    assert (job.scheduler.new_prefix_slack, job.scheduler.rebalance_ratio) == (0.5, 2.0)
    assert _job("--explore-prefill-window-s", "30").scheduler.explore_prefill_window_s == 30.0
    assert job.scheduler.window_s == SchedulerConfig().window_s


def test_a_bad_scheduler_flag_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="new_prefix_slack must be >= 0, got -1.0"):
        _job("--new-prefix-slack", "-1")


def test_eviction_window_flag_reaches_the_local_scheduler_and_a_negative_one_is_refused():
    assert _job("--eviction-window-s", "2.5").local.eviction_window_s == 2.5
    assert _job("--eviction-window-s", "0").local.eviction_window_s == 0.0
    with pytest.raises(
        ConfigError, match="eviction_window_s must be >= 0 .0 turns it off., got -1"
    ):
        _job("--eviction-window-s", "-1")


def test_a_host_kv_tier_flag_reaches_the_engine_config_and_a_non_positive_one_is_refused():
    assert _job().engine.kv_offload_gib is None
    assert _job("--kv-offload-gib", "200").engine.kv_offload_gib == 200.0
    with pytest.raises(ConfigError, match="kv_offload_gib must be > 0, got 0.0"):
        _job("--kv-offload-gib", "0")
