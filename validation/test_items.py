"""Per-item faithfulness checks over (layer, sample, query_pos): ids ``L1-S3-Q17``.

For every head and every key position ``j ≤ query_pos``:

* closure — the sum over all (component ∪ {Δ, bias}) pairs equals the target model's own
  logit within the rounding tolerance (docs/design.md §3);
* bound — ``|r| ≤ B`` for the asserted bound (``--bound``, docs/design.md §4).

A failure reports the worst head and key, r, B, |r|/B and the closure error; figures for
failed items go to the artifacts directory (``--plots``).
"""


def test_decomposition_closes_and_stays_within_the_bound(qk, qk_item, qk_record):
    result = qk.item(*qk_item)
    qk_record("item", result.as_dict())
    assert result.passed, result.explain()
