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
    assert report.params == sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.sparsity == report.zeros / report.params
    assert report.to_dict()["sparsity/layer1.0.conv1"] == row.sparsity


def test_table_lists_every_layer_and_extra_numbers():
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    table = sparsity_report(model).format_table(extra={"test/acc": 0.5})
    assert "blocks.0.attn.qkv" in table and "head" in table and "test/acc" in table and "all parameters" in table
    assert str(sparsity_report(model)).count("\n") == len(sparsity_report(model).layers) + 4
