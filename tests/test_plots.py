import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_vae import VAE
from pyro_vae.plots import (
    image_grid,
    latent_manifold,
    latent_scatter,
    pca_2d,
    prior_samples,
    reconstructions,
    run_figures,
    save_figures,
    tile,
    training_curves,
)


def test_tile_places_each_image_in_its_cell():
    images = np.stack([np.full(4, v) for v in (0.1, 0.2, 0.3)])  # three 2x2 images
    canvas = tile(images, ncols=2, image_shape=(2, 2), pad=1)
    assert canvas.shape == (5, 5)
    assert canvas[0, 0] == pytest.approx(0.1) and canvas[0, 3] == pytest.approx(0.2)
    assert canvas[3, 0] == pytest.approx(0.3) and canvas[3, 3] == 1.0  # empty cell is white


def test_pca_finds_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g) * torch.tensor([5.0, 1.0, 0.1])
    points, explained = pca_2d(z)
    assert points.shape == (500, 2)
    assert explained[0] > 0.9 and explained[0] > explained[1]
    assert torch.corrcoef(torch.stack([points[:, 0], z[:, 0]]))[0, 1].abs() > 0.99


def test_figure_functions_return_figures_and_draw_into_a_given_axes():
    x = torch.rand(8, 784)
    fig = Figure()
    ax = fig.add_subplot()
    assert image_grid(x, ax=ax) is fig
    assert isinstance(reconstructions(x, x), Figure)
    curves = training_curves([{"epoch": 1, "train_elbo": -200, "test_elbo": -190},
                              {"epoch": 2, "train_elbo": -150, "test_elbo": -160}])
    assert curves.axes[0].get_ylabel() == "ELBO (nats per image)"
    assert len(curves.axes[0].lines) == 2
    scatter = latent_scatter(torch.randn(50, 5), np.arange(50) % 10)
    assert "PC 1" in scatter.axes[0].get_xlabel()


def test_manifold_needs_two_latent_dimensions():
    with pytest.raises(ValueError, match="z_dim = 2"):
        latent_manifold(VAE(z_dim=3, hidden_dims=(16,)))
    fig = latent_manifold(VAE(z_dim=2, hidden_dims=(16,)), n=5)
    assert fig.axes[0].get_xlabel().startswith("z_1")


@pytest.mark.parametrize("likelihood, kinds", [
    ("continuous-bernoulli", {"samples", "samples_drawn"}),
    ("bernoulli-relaxed", {"samples"}),  # not a distribution: no draws
])
def test_prior_samples_show_draws_only_where_the_likelihood_has_them(likelihood, kinds):
    assert set(prior_samples(VAE(likelihood, hidden_dims=(16,)), 9)) == kinds


def test_run_figures_are_saved_as_png(tmp_path):
    vae = VAE(z_dim=2, hidden_dims=(16,))
    x, y = torch.bernoulli(torch.rand(40, 784)), torch.arange(40) % 10
    metrics = [{"epoch": 1, "train_elbo": -300.0, "test_elbo": -290.0}]
    figures = run_figures(vae, x, y, metrics)
    assert set(figures) == {"reconstructions", "samples", "samples_drawn", "curves", "latent",
                            "manifold", "traversals", "interpolations"}
    paths = save_figures(figures, tmp_path / "figures")
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_khat_bars_are_coloured_by_threshold_and_labelled_by_image():
    from matplotlib.colors import to_hex

    from pyro_vae.plots import khat_per_image

    fig = khat_per_image([0.2, 0.6, 1.3], images=[4, 7, 9])
    ax = fig.axes[0]
    colours = [to_hex(bar.get_facecolor()) for bar in ax.patches]
    assert colours == [to_hex("tab:green"), to_hex("tab:orange"), to_hex("tab:red")]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "7", "9"]
    assert ax.get_ylim()[1] > 1.3  # the largest bar and the threshold labels fit


def test_long_titles_wrap_and_small_grids_keep_room_for_them():
    fig = image_grid(torch.rand(1, 784), title="1 prior samples, mean of p(x | z) -- "
                                               "quickstart: continuous-bernoulli, epoch 10")
    assert fig.get_figwidth() >= 3.0
    assert "\n" in fig.axes[0].get_title()


def test_the_first_epoch_does_not_squash_the_curves():
    metrics = [{"epoch": 1, "train_elbo": -400.0, "test_elbo": -200.0}] + [
        {"epoch": e, "train_elbo": -120.0 + e, "test_elbo": -118.0 + e} for e in range(2, 6)]
    ax = training_curves(metrics).axes[0]
    assert ax.get_ylim()[0] > -200  # scaled to the later epochs
    assert any("off scale" in t.get_text() for t in ax.texts)


def test_figures_render_inline_as_png():
    fig = image_grid(torch.rand(4, 784))
    assert fig._repr_png_()[:4] == b"\x89PNG"
