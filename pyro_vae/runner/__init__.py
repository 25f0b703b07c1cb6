"""Running training: everything between a validated config and a finished run folder.

- :mod:`~pyro_vae.runner.resolve`: the one place where data meets model;
- :mod:`~pyro_vae.runner.step`: the one training step (:meth:`Trainer.step`), its matrix
  products through oneDNN (:mod:`~pyro_vae.onednn`);
- :mod:`~pyro_vae.runner.threads`, :mod:`~pyro_vae.runner.allocator`: the CPU's threads
  and glibc's malloc set for training;
- :mod:`~pyro_vae.runner.state`: the one checkpoint schema;
- :mod:`~pyro_vae.runner.rundir`: the run folder and the :class:`Run` users get back;
- :mod:`~pyro_vae.runner.distributed`: torchrun / DDP;
- :mod:`~pyro_vae.runner.signals`: Ctrl-C and SIGTERM between steps;
- :mod:`~pyro_vae.runner.train`: :func:`train`, the epochs, which string them together.
"""
