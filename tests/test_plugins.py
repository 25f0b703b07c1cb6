"""A user's own likelihood, registered in the user's module, through every command, each in
a fresh process (as a user runs them), and the rules of registration."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch.nn.functional as F
from torch.distributions import constraints

import pyro_vae
from pyro_vae.errors import ConfigError, NotRegisteredError
from pyro_vae.likelihoods import _REGISTRY

LAPLACE_MODULE = textwrap.dedent('''
    """A user's likelihoods (tests/test_plugins.py writes this file)."""
    import pyro.distributions as dist
    import torch.nn.functional as F
    from torch.distributions import constraints

    from pyro_vae import register_likelihood


    @register_likelihood("laplace-test", num_params=2, support=constraints.real)
    def laplace(loc, raw_scale):
        """Laplace with a learned scale."""
        return dist.Laplace(loc, F.softplus(raw_scale) + 1e-3)
''')

SMALL = ["--dataset", "mnist-sample", "--train-limit", "128", "--test-limit", "20",
         "--hidden-dims", "16", "--z-dim", "2", "--batch-size", "64", "--quiet"]


def pyro_vae_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pyro_vae", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_likelihood_in_the_users_module_works_with_every_command(tmp_path):
    (tmp_path / "mylik.py").write_text(LAPLACE_MODULE)
    run = tmp_path / "run"
    trained = pyro_vae_cli("train", "--import", "mylik", "--likelihood", "laplace-test",
                           "--epochs", "1", *SMALL, "--out", run, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["likelihood_module"] == "mylik"

    # without the module, each command says what to load, in one line, with status 2
    for command in (["evaluate", run], ["plot", run], ["train", "--resume", run]):
        missing = pyro_vae_cli(*command, cwd=tmp_path)
        assert missing.returncode == 2
        assert missing.stderr.strip().splitlines() == [
            "pyro-vae: error: likelihood 'laplace-test' is registered by module 'mylik'; "
            "--import mylik"]

    for command in (["evaluate", run, "--iwae-samples", "5"],
                    ["plot", run, "--only", "samples"],
                    ["sample", run, "-n", "4", "--out", tmp_path / "s.png"],
                    ["diagnose", run, "--images", "1", "--num-samples", "10", "--warmup", "10",
                     "--iwae-samples", "20"],
                    ["train", "--resume", run, "--epochs", "2"]):
        done = pyro_vae_cli(*command, "--import", "mylik", cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1, 2]
    listed = pyro_vae_cli("likelihoods", "--import", "mylik", cwd=tmp_path)
    assert "laplace-test\n  Laplace with a learned scale." in listed.stdout


def test_an_import_that_fails_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('oops')\n")
    for module, message in [("nosuchmodule", "--import nosuchmodule: no module named"),
                            ("broken", "--import broken failed: RuntimeError: oops")]:
        result = pyro_vae_cli("likelihoods", "--import", module, cwd=tmp_path)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_a_likelihood_from_main_is_named_as_such_in_a_fresh_process(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(LAPLACE_MODULE + textwrap.dedent(f'''
        from pyro_vae import RunConfig, train
        config = RunConfig()
        config.model.likelihood = "laplace-test"
        config.model.hidden_dims, config.model.z_dim = (16,), 2
        config.data.dataset, config.data.train_limit, config.data.test_limit = \\
            "mnist-sample", 128, 20
        config.train.epochs = 1
        train(config, {str(tmp_path / "run")!r}, progress=False)
    '''))
    made = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr
    assert "defined in __main__" in made.stderr  # warned while training
    result = pyro_vae_cli("evaluate", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "defined in __main__ (a script or notebook)" in result.stderr
    assert "move it into a module, then --import it" in result.stderr


def test_installed_packages_register_through_entry_points(tmp_path):
    """A package that declares the entry-point group is loaded when a name is unknown."""
    site = tmp_path / "site"
    (site / "mylik_pkg").mkdir(parents=True)
    (site / "mylik_pkg" / "__init__.py").write_text(LAPLACE_MODULE)
    info = site / "mylik_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mylik-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pyro_vae.likelihoods]\nlaplace-test = mylik_pkg\n")
    code = ("import pyro_vae; print(pyro_vae.get_likelihood('laplace-test').num_params)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


def test_registering_the_same_function_again_is_allowed_and_another_is_not():
    name = "scaled-test"
    try:
        def make():
            def scaled(logits):
                return pyro_vae.get_likelihood("bernoulli").build(logits)
            return scaled
        first, again = make(), make()  # a notebook cell run twice: equal name and origin
        pyro_vae.register_likelihood(name)(first)
        pyro_vae.register_likelihood(name)(again)
        assert pyro_vae.get_likelihood(name).build is again

        def other(loc):
            return F.softplus(loc)
        with pytest.raises(ConfigError, match="registered already.*overwrite=True"):
            pyro_vae.register_likelihood(name, support=constraints.real)(other)
        pyro_vae.register_likelihood(name, overwrite=True)(other)
        assert pyro_vae.get_likelihood(name).build is other
    finally:
        _REGISTRY._items.pop(name, None)
        _REGISTRY._origins.pop(name, None)


def test_an_unknown_name_says_which_module_the_run_recorded():
    with pytest.raises(NotRegisteredError, match="registered by module 'their_module'"):
        pyro_vae.get_likelihood("nowhere", "their_module")
    with pytest.raises(NotRegisteredError, match="must be one of: bernoulli"):
        pyro_vae.get_likelihood("nowhere")


STUDENT_MODULE = textwrap.dedent('''
    """A user's model (tests/test_plugins.py writes this file): a VAE whose prior is a
    Student-t, written as a Pyro model and guide under pyro-vae's model protocol."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    from pyro_vae import register_model
    from pyro_vae.model import data_plate, weighted
    from pyro_vae.networks import Decoder, Encoder


    class StudentVAE(nn.Module):
        def __init__(self, x_dim, z_dim, hidden, likelihood, df):
            super().__init__()
            self.x_dim, self.z_dim, self.likelihood, self.df = x_dim, z_dim, likelihood, df
            self.encoder = Encoder(x_dim, hidden, z_dim, "relu")
            self.decoder = Decoder(z_dim, hidden, x_dim, likelihood.num_params, "relu")

        def model(self, x, num_data=None, kl_weight=None, index=None):
            with data_plate(x, num_data, index):
                prior = dist.StudentT(self.df, x.new_zeros(()), x.new_ones(()))
                with weighted(kl_weight):
                    z = pyro.sample("z", prior.expand([x.shape[0], self.z_dim]).to_event(1))
                pyro.sample("x", self.decode(z).to_event(1), obs=x)

        def guide(self, x, num_data=None, kl_weight=None, index=None):
            with data_plate(x, num_data, index), weighted(kl_weight):
                pyro.sample("z", self.encode(x).to_event(1))

        def encode(self, x):
            return dist.Normal(*self.encoder(x))

        def decode(self, z):
            return self.likelihood.distribution(self.decoder(z))

        def reconstruct(self, x):
            return self.decode(self.encode(x).loc).mean

        def sample_prior(self, n):
            p = next(self.parameters())
            z = dist.StudentT(self.df, p.new_zeros(()), 1.0).sample((n, self.z_dim))
            return self.decode(z)


    @register_model("student-t-test", options={"df": 3.0})
    def build(config, likelihood, df):
        """A VAE with a Student-t prior."""
        return StudentVAE(config.x_dim, config.z_dim, config.hidden_dims, likelihood, df)
''')


@pytest.mark.slow
def test_a_model_in_the_users_module_works_with_every_command(tmp_path):
    (tmp_path / "mymodel.py").write_text(STUDENT_MODULE)
    run = tmp_path / "run"
    trained = pyro_vae_cli("train", "--import", "mymodel", "--model", "student-t-test",
                           "--model-option", "df=4", "--epochs", "1", *SMALL, "--out", run,
                           cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())["model"]
    assert (config["name"], config["model_module"], config["model_options"]) == (
        "student-t-test", "mymodel", {"df": 4.0})

    for command in (["evaluate", run], ["plot", run], ["train", "--resume", run]):
        missing = pyro_vae_cli(*command, cwd=tmp_path)
        assert missing.returncode == 2
        assert missing.stderr.strip().splitlines() == [
            "pyro-vae: error: model 'student-t-test' is registered by module 'mymodel'; "
            "--import mymodel"]

    for command in (["evaluate", run, "--iwae-samples", "5"],
                    ["plot", run],
                    ["sample", run, "-n", "4", "--out", tmp_path / "s.png"],
                    ["train", "--resume", run, "--epochs", "2"]):
        done = pyro_vae_cli(*command, "--import", "mymodel", cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1, 2]
    figures = {p.stem for p in (run / "figures").glob("*.png")}
    assert {"reconstructions", "samples", "latent", "traversals"} <= figures
    refused = pyro_vae_cli("diagnose", run, "--import", "mymodel", cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    listed = pyro_vae_cli("models", "--import", "mymodel", cwd=tmp_path)
    assert "student-t-test\n  A VAE with a Student-t prior.\n  options: df=3" in listed.stdout
    wrong = pyro_vae_cli("train", "--import", "mymodel", "--model", "student-t-test",
                         "--model-option", "nu=4", *SMALL, "--out", tmp_path / "w",
                         cwd=tmp_path)
    assert wrong.returncode == 2 and "options are: df=3" in wrong.stderr
    assert not (tmp_path / "w").exists()


def test_an_import_that_exits_the_process_is_refused_in_one_line(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    result = pyro_vae_cli("train", "--import", "quits", *SMALL, "--out", tmp_path / "r",
                          cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "r").exists()
    assert result.stderr.strip().splitlines() == [
        "pyro-vae: error: --import quits called sys.exit(0) while being imported; a module "
        "to import defines and registers parts, and returns"]
