"""Outlier exposure (Hendrycks et al. 2019) as a linear probe: what tells in-domain rows from rows of text that is
not, fitted in float64. `ARTMemory.fit_outlier_exposure` keeps it and adds it to the calibrated verdict.
Design: docs/design.md#outlier-exposure. Imports only torch (it travels to the Hub as remote code)."""

import torch
import torch.nn.functional as F

SCALE_FLOOR = 1e-6  # a dimension with no spread over the rows is divided by this instead


@torch.enable_grad()
def fit_linear_probe(inliers: torch.Tensor, outliers: torch.Tensor, l2: float = 1e-2, max_iter: int = 300):
    """
    A logistic regression, `inliers` 0 and `outliers` 1, on rows standardised by the pooled mean `center` and standard
    deviation `scale` (floored at `SCALE_FLOOR`), minimising mean binary cross-entropy + `l2` |w|^2 with L-BFGS in
    float64. Returns `(center, scale, weight, bias)`: the probe's score of a row x is ((x - center) / scale) . weight
    + bias, higher for rows more like the outliers.
    """
    x = torch.cat([inliers, outliers]).double()
    y = torch.cat([x.new_zeros(len(inliers)), x.new_ones(len(outliers))])
    center, scale = x.mean(0), x.std(0).clamp(min=SCALE_FLOOR)
    x = (x - center) / scale
    weight = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def objective():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return center, scale, weight.detach(), bias.detach()
