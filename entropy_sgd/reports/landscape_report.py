"""The report of `entropy_sgd.reports.landscape`: landscape.md and plots."""

from typing import Dict

from matplotlib.figure import Figure  # No pyplot: no global backend.
import numpy as np

from entropy_sgd.analysis import linear_algebra


# ------------------------------------------------------------------- Report.


def plot_density(density: linear_algebra.Density, top_eigenvalues, path: str,
                 log_scale: bool = True) -> str:
  figure = Figure(figsize=(6.5, 4.2))
  axis = figure.subplots()
  values = np.maximum(density.density, 1e-12) if log_scale else (
      density.density)
  axis.plot(density.grid, values, color="C0")
  for eigenvalue in top_eigenvalues:
    axis.axvline(eigenvalue, color="C3", alpha=0.4, linewidth=0.8)
  if log_scale:
    axis.set_yscale("log")
    axis.set_ylim(bottom=max(1e-9, values.max() * 1e-9))
  axis.set_xlabel("Hessian eigenvalue")
  axis.set_ylabel("density" + (" (log scale)" if log_scale else ""))
  axis.set_title(f"SLQ spectral density (Gaussian sigma {density.sigma:.3g})"
                 + ("; red: top eigenvalues" if len(top_eigenvalues) else ""),
                 fontsize=9)
  axis.grid(alpha=0.3)
  return _save(figure, path)


def plot_curve(alphas, loss, accuracy, title, path, marks=()) -> str:
  figure = Figure(figsize=(6.5, 4.2))
  axis = figure.subplots()
  axis.plot(alphas, loss, "o-", color="C0", markersize=3, label="loss")
  axis.set_xlabel("a")
  axis.set_ylabel("training loss", color="C0")
  other = axis.twinx()
  other.plot(alphas, accuracy, "s--", color="C1", markersize=3,
             label="accuracy")
  other.set_ylabel("training accuracy", color="C1")
  for mark in marks:
    axis.axvline(mark, color="grey", alpha=0.5, linewidth=0.8)
  axis.set_title(title, fontsize=9)
  axis.grid(alpha=0.3)
  return _save(figure, path)


def plot_plane(alphas, betas, loss, path) -> str:
  figure = Figure(figsize=(5.5, 4.6))
  axis = figure.subplots()
  contours = axis.contourf(alphas, betas, loss, levels=20, cmap="viridis")
  axis.contour(alphas, betas, loss, levels=20, colors="k", linewidths=0.3)
  figure.colorbar(contours, ax=axis, label="training loss")
  axis.plot([0], [0], "r+", markersize=10)
  axis.set_xlabel("a (direction 1)")
  axis.set_ylabel("b (direction 2)")
  axis.set_title("loss at x + a d1 + b d2 (filter-normalised)", fontsize=9)
  return _save(figure, path)


def _save(figure, path):
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  return path


def _number(value, digits=4):
  if value is None:
    return "n/a"
  return f"{value:.{digits}g}"


def markdown_report(results: Dict) -> str:
  """landscape.md: the scalar measures, what they mean, and the plots."""
  r = results
  lines = [
      f"# Loss landscape of {r['run_dir']}", "",
      f"{r['model']} on {r['dataset']} trained with {r['optimizer']}; "
      f"checkpoint `{r['checkpoint']}`. f = mean training cross-entropy "
      f"over {r['examples']} un-augmented training examples ({r['batches']} "
      f"batches of {r['batch_size']}), BatchNorm in inference mode with "
      f"statistics recalibrated on them, no weight decay; "
      f"{r['num_parameters']:,} parameters.", "",
      "| measure | value | meaning |", "|---|---|---|",
      f"| loss, accuracy at x | {_number(r['loss'])}, "
      f"{_number(r['accuracy'])} | on the examples above |"]
  if "heldout_accuracy" in r:
    lines.append(f"| held-out loss, accuracy at x | "
                 f"{_number(r['heldout_loss'])}, "
                 f"{_number(r['heldout_accuracy'])} | {r['heldout_split']} "
                 f"split, {r['heldout_examples']} examples, at the same "
                 f"BatchNorm statistics |")
  if "hessian_top_eigenvalues" in r:
    values = ", ".join(_number(v) for v in r["hessian_top_eigenvalues"])
    lines.append(f"| top Hessian eigenvalues | {values} | "
                 f"{r['hessian_eigen_method']}, "
                 f"{r['hessian_eigen_iterations']} products; curvature of "
                 f"the sharpest directions |")
  if "hessian_trace" in r:
    lines.append(f"| Hessian trace | {_number(r['hessian_trace'])} ± "
                 f"{_number(r['hessian_trace_stderr'], 2)} | Hutchinson, "
                 f"{r['hessian_trace_probes']} Rademacher probes (± one "
                 f"standard error); total curvature |")
  if "local_entropy" in r:
    for e in r["local_entropy_by_gamma"]:
      lines.append(
          f"| local entropy Phi (gamma {_number(e['gamma'])}, T "
          f"{_number(e['temperature'])}) | {_number(e['value'], 6)} ± "
          f"{_number(e['stderr'], 2)}; deficit {_number(e['deficit'])} ± "
          f"{_number(e['deficit_stderr'], 2)} nats | higher Phi, smaller "
          f"deficit: a wider valley (deficit ~ 1/2 sum log(1 + "
          f"lambda/gamma)) |")
  if "epsilon_sharpness" in r:
    lines.append(f"| epsilon-sharpness (epsilon "
                 f"{_number(r['epsilon_sharpness_epsilon'])}) | "
                 f"{_number(r['epsilon_sharpness'])} % | largest loss "
                 f"increase in the box epsilon(abs(x) + 1), relative to "
                 f"1 + f(x) (Keskar et al.) |")
  if "adaptive_sharpness_worst" in r:
    lines.append(
        f"| adaptive sharpness (rho {_number(r['adaptive_sharpness_rho'])}) "
        f"| worst case {_number(r['adaptive_sharpness_worst'])}; average "
        f"{_number(r['adaptive_sharpness_average'])} ± "
        f"{_number(r['adaptive_sharpness_average_stderr'], 2)} | loss "
        f"increase for perturbations relative to abs(w): the box max by "
        f"{r['adaptive_sharpness_steps']} ascent steps, the Gaussian mean "
        f"over {r['adaptive_sharpness_samples']} draws (Andriushchenko et "
        f"al. 2023); invariant to rescaling into BatchNorm |")
  if "pac_bayes_sigma" in r:
    lines.append(
        f"| PAC-Bayes magnitude flatness | sigma' "
        f"{_number(r['pac_bayes_sigma'])}; 1/sigma'^2 "
        f"{_number(r['pac_bayes_flatness'])} | largest sigma' with "
        f"u ~ N(0, sigma'^2 w^2 + {_number(r['pac_bayes_epsilon'])}^2) "
        f"raising the training error by <= "
        f"{_number(r['pac_bayes_max_error_increase'])} on average (Jiang "
        f"et al. 2020); larger sigma': flatter |")
  if "interpolation" in r:
    i = r["interpolation"]
    barrier = max(i["loss"]) if i["loss"] else None
    inside = [l for a, l in zip(i["alphas"], i["loss"]) if 0 <= a <= 1]
    lines.append(f"| interpolation to {i['compare_run_dir']} "
                 f"({i['compare_optimizer']}) | max loss on [0, 1]: "
                 f"{_number(max(inside) if inside else barrier)} | a "
                 f"barrier between the two solutions if above both ends |")
  if r.get("plots"):
    lines += ["", "## Plots", ""]
  captions = {
      "density": "Hessian eigenvalue density (stochastic Lanczos "
                 "quadrature, Gaussian-broadened); mass near 0 and few "
                 "outliers mean a flat minimum.",
      "direction_1d": "Loss and accuracy along one filter-normalised "
                      "random direction (Li et al. 2018); a wide, flat "
                      "basin around a = 0 means a wide valley.",
      "direction_2d": "Loss on the plane of two filter-normalised random "
                      "directions; widely spaced contours around the "
                      "centre mean a flat minimum.",
      "interpolation": "Loss and accuracy on (1 - a) x_A + a x_B, BatchNorm "
                       "recalibrated at every point; a = 0 is this run, "
                       "a = 1 the --compare run.",
  }
  for name, file in r.get("plots", {}).items():
    lines += [f"![{name}]({file})", "", captions[name], ""]
  if "direction_1d" in r:
    lines += ["Directions: BatchNorm scales and offsets and biases are zero "
              "in the directions; BatchNorm statistics stay those at x.", ""]
  return "\n".join(lines) + "\n"
