import timm
import torch

from lightning_prune import sparsity_report


def test_report_counts_zeros_params_and_zero_channels():
    model = timm.create_model("test_resnet", num_classes=10)
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight[:2] = 0  # two whole filters
        conv.weight[2, 0, 0, 0] = 0  # one more weight
    report = sparsity_report(model)
    row = next(layer for layer in report.layers if layer.name == "layer1.0.conv1")
    per_filter = conv.weight[0].numel()
    assert row.zeros == 2 * per_filter + 1 and row.zero_channels == 2 and row.channels == conv.out_channels
    assert row.params == conv.weight.numel() and row.sparsity == row.zeros / row.params
    targeted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                and m is not model.conv1[0] and m is not model.fc]  # timm's first conv and classifier are not
    assert report.params == sum(m.weight.numel() for m in targeted)
    assert {layer.name for layer in report.layers}.isdisjoint({"conv1.0", "fc"})
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.sparsity == report.zeros / report.params
    assert report.to_dict()["sparsity/layer1.0.conv1"] == row.sparsity


def test_table_lists_every_layer_and_extra_numbers():
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    table = sparsity_report(model).format_table(extra={"test/acc": 0.5})
    assert "blocks.0.attn.qkv" in table and "test/acc" in table and "all parameters" in table
    # classifier and first conv: not targets
    assert "\nhead " not in table and "patch_embed.proj" not in table
    assert str(sparsity_report(model)).count("\n") == len(sparsity_report(model).layers) + 4


def test_report_and_logged_sparsity_mean_the_same_for_a_gate_callback(tmp_path):
    """`prune/sparsity` of a channel-gate callback counts the targeted weights only (no BatchNorm or bias
    entries), exactly what sparsity_report counts."""
    from lightning_prune import GroupLassoPruning
    from lightning_prune.testing import fit_tiny

    cb = GroupLassoPruning(lam=0.1, gate_lr=0.2, capture_threshold=0.02, prune_threshold=0.3,
                           finalize_step=0.75, round_to=1, verbose=False)
    _, model = fit_tiny([cb], tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=0)
    logged = cb.sparsity_metrics()["prune/sparsity"]
    assert 0.0 < logged < 1.0
    assert set(cb.reported_names()) == {f"{layer.name}.weight" for layer in sparsity_report(model).layers}
    assert not any(".bn" in n or n.endswith(".bias") for n in cb.reported_names())
    assert logged == sparsity_report(model).sparsity
