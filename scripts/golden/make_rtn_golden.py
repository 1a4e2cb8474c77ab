# Golden RTN grid (tests/gptq_pack.rs) from the reference GPTQ quantizer.
# Usage: PYTHONPATH=<checkout of IST-DASLab/gptq, commit 2d65066> <venv>/bin/python scripts/golden/make_rtn_golden.py
# The reference code is not part of this repository; fetch it separately. Output is Rust source to paste.
import torch
from quant import Quantizer, quantize
torch.manual_seed(0)
N, K, G = 4, 16, 8
W = (torch.randn(N, K) * 0.05).float()
W[2] = W[2].abs()          # a row with no negatives (symmetric quirk)
W[3, 8:] = 0.0             # an all-zero group
print("const W_BITS: [u32; %d] = [%s];" % (N*K, ", ".join("0x%08x" % (v & 0xffffffff) for v in W.flatten().view(torch.int32).tolist())))
for bits, sym in [(2, False), (3, False), (4, True), (4, False), (8, True)]:
    codes = torch.zeros(N, K, dtype=torch.int64); scales=[]; zeros=[]
    for g in range(K // G):
        q = Quantizer(); q.configure(bits, perchannel=True, sym=sym)
        blk = W[:, g*G:(g+1)*G]
        q.find_params(blk, weight=True)
        c = torch.clamp(torch.round(blk / q.scale) + q.zero, 0, q.maxq)
        codes[:, g*G:(g+1)*G] = c.long()
        scales.append(q.scale.flatten()); zeros.append(q.zero.flatten())
        # sanity: the reference's own fake-quant equals scale*(code-zero)
        assert torch.equal(quantize(blk, q.scale, q.zero, q.maxq), q.scale * (c - q.zero))
    S = torch.stack(scales); Z = torch.stack(zeros)
    print("// bits=%d sym=%s" % (bits, sym))
    print("(%d, %s, [%s], [%s], [%s])," % (bits, "true" if sym else "false",
        ", ".join("0x%08x" % (v & 0xffffffff) for v in S.flatten().view(torch.int32).tolist()),
        ", ".join(str(int(v)) for v in Z.flatten().tolist()),
        ", ".join(str(v) for v in codes.flatten().tolist())))
