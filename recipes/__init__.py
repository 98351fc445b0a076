"""Runnable training recipes built on ec_hooks and lightning_plugin.

* ``python -m recipes.compare`` -- every communication method on the offline digits set, one table
  and one plot of accuracy against bytes (:mod:`recipes.compare`);
* ``python -m recipes.train fit --config recipes/configs/<data>_<method>.yaml`` -- one run
  (LightningCLI, :mod:`recipes.train`);
* ``python -m recipes.memsgd_paper`` -- the logistic-regression experiment of the Mem-SGD paper.

Modules: :mod:`recipes.models` (ResNet-20/18, small digits networks), :mod:`recipes.data`
(CIFAR-10 reader, digits, synthetic data), :mod:`recipes.module` (the LightningModule),
:mod:`recipes.baselines` (torch's own comm hooks as a strategy, on every device).
"""
