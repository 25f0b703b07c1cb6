"""The thread tuner: the fastest intra-op thread count, followed as the load changes."""

import torch

from pyro_vae import RunConfig, train
from pyro_vae.runner.threads import ThreadTuner

from .helpers import tiny_config


class Machine:
    """A fake clock whose steps cost what the thread count and the load say."""

    def __init__(self, cost):
        self.cost, self.now, self.threads, self.busy = cost, 0.0, 2, False

    def clock(self):
        return self.now

    def set_threads(self, n):
        self.threads = n

    def run(self, tuner, steps):
        counts = []
        for _ in range(steps):
            self.now += self.cost[self.busy][self.threads]
            tuner.step_done()
            counts.append(self.threads)
        return counts


# seconds per step, as measured on a 2-core machine: quiet, and with a one-core busy loop
COST = {False: {2: 0.005, 1: 0.010}, True: {2: 0.016, 1: 0.010}}


def tuner_for(machine, **kwargs):
    return ThreadTuner(window=8, interval=256, clock=machine.clock,
                       set_threads=machine.set_threads, most=2, **kwargs)


def test_a_quiet_machine_keeps_every_thread_but_for_the_probes():
    machine = Machine(COST)
    tuner = tuner_for(machine)
    counts = machine.run(tuner, 2000)
    assert counts[-1] == 2
    # probing costs one window at 1 thread per interval: about 8 / 256 of the steps
    assert counts.count(1) / len(counts) < 0.06


def test_a_busy_core_moves_training_to_one_thread_and_back_when_it_is_free():
    machine = Machine(COST)
    tuner = tuner_for(machine)
    machine.run(tuner, 100)
    assert machine.threads == 2
    machine.busy = True
    counts = machine.run(tuner, 100)  # the slowdown is seen within a few windows
    assert counts[-1] == 1 and counts[40:].count(2) <= 8
    machine.busy = False
    counts = machine.run(tuner, 400)  # the next periodic probe finds 2 threads faster
    assert counts[-1] == 2


def test_the_tuner_does_nothing_with_one_thread_and_restores_the_count_it_found():
    machine = Machine(COST)
    single = ThreadTuner(clock=machine.clock, set_threads=machine.set_threads, most=1)
    assert not single.active
    tuner = tuner_for(machine)
    machine.busy = True
    machine.run(tuner, 200)
    assert machine.threads == 1
    tuner.close()
    assert machine.threads == 2


def test_training_gives_the_same_numbers_whatever_the_thread_count(tmp_path):
    """The tuner may change the count at any step: the results must not depend on it."""
    runs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            config = tiny_config(epochs=2)
            run = train(RunConfig.from_dict(config.to_dict()), tmp_path / f"t{threads}",
                        progress=False)
            runs.append(run)
    finally:
        torch.set_num_threads(previous)
    one, two = runs
    assert [r["test_elbo"] for r in one.metrics] == [r["test_elbo"] for r in two.metrics]
    assert all(torch.equal(a, b) for a, b in zip(one.vae.state_dict().values(),
                                                 two.vae.state_dict().values()))
