"""The paper's studies: commands that train or probe poolings to reproduce its figures and tables.

- ``pooling_study`` — ``vseinf study pooling``: the same recipe trained once per pooling choice (the
  K-max grid of Figure 6, the aggregator comparison of Figure 4 / supplementary Tables 1–2);
- ``synth`` — ``vseinf synth``: can a coefficient generator learn a known pooling pattern, and
  does it carry over to unseen set sizes (supplementary Table 6);
- ``plots`` — every plot: a trained model's learned coefficients (``vseinf plot-pooling``, Figure 5)
  and the pooling study's heat map and bar chart.
"""
