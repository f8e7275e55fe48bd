"""The one training loop (idip_jax/loop.py) that DIP fits and denoiser training share: when it saves,
stops and raises on Ctrl-C, and its rate and compile estimate (no JAX: a counter as the state)."""

import time

import pytest

from idip_jax import loop


def count(state, done, length):
  return state + length, {"steps": length}


def run(total, chunk_len, save_every=0, save_last=False, stop_at=None, press_at=None, saved=None):
  saved = [] if saved is None else saved

  def after(state, done, m):
    if done == press_at:
      loop.INTERRUPTED.set()
    return f"state {state}", done == stop_at

  try:
    out = loop.run(
      count,
      0,
      0,
      total,
      chunk_len,
      loop.Progress("", 1, "image-steps"),
      after,
      lambda s, d: saved.append((s, d)),
      save_every,
      save_last=save_last,
    )
  finally:
    loop.INTERRUPTED.clear()
  return out, saved


def test_saves_past_each_multiple_and_never_after_the_last_step_unless_asked():
  (state, done, _), saved = run(20, 3, save_every=7)
  assert state == done == 20 and saved == [(9, 9), (15, 15)]  # fits: the results are written at the end
  (_, _, _), saved = run(20, 3, save_every=6, save_last=True)
  assert saved == [(6, 6), (12, 12), (18, 18), (20, 20)]  # training: its checkpoint is the model


def test_ctrl_c_saves_then_stops_and_a_stop_ends_the_loop():
  with pytest.raises(KeyboardInterrupt):
    run(20, 3, save_every=100, press_at=6)
  saved = []
  with pytest.raises(KeyboardInterrupt):
    run(6, 3, press_at=3, saved=saved)
  assert [d for _, d in saved] == [3]  # at the first chunk end, before raising
  (state, done, _), saved = run(20, 3, stop_at=9, save_every=100)
  assert state == done == 9 and saved == []  # every run stopped: the loop ends, no spent checkpoint
  (state, done, _), saved = run(20, 3, stop_at=9, save_last=True)
  assert done == 9 and saved == [(9, 9)]


def test_resumes_from_done_and_estimates_compile_time():
  timing = loop.Timing()

  def slow_first(state, done, length):
    time.sleep(0.2 if done == 4 else 0.01)  # the first chunk also compiles
    return state + length, {}

  state, done, timing = loop.run(
    slow_first, 4, 4, 10, 2, loop.Progress("", 1, "x"), lambda *a: ("", False), timing=timing
  )
  assert state == done == 10 and timing.first[0] == 2 and timing.steady_steps == 4
  assert 0.15 < timing.compile_seconds < 0.4 and 20 < timing.rate < 250
