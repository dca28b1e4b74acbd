"""Every pyprune op schema, defined once. The kernels register against these names: C++ through
TORCH_LIBRARY_IMPL(pyprune, CPU, ...) in csrc/, and Python (fakes, autograd, the CUDA router, the reference
fallback when pyprune._C is missing) in pyprune/ops/<op>.py.
"""

import torch

lib = torch.library.Library("pyprune", "DEF")

SCHEMAS = {
    # y = x W^T + b; W (out_features x in_features) in CSR with int32 indices.
    "csr_linear": "csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int out_features, Tensor? bias) -> Tensor",
    # W in BSR: values (nnz_blocks, bh, bw); blocks past the weight's edge are zero-padded.
    "bsr_linear": "bsr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int out_features, Tensor? bias) -> Tensor",
    # W in 2:4: values (K4/2, out), meta (K4/8, out) uint8, K4 = in_features rounded up to a multiple of 8.
    "sparse24_linear": "sparse24_linear(Tensor x, Tensor values, Tensor meta, int out_features, "
    "Tensor? bias) -> Tensor",
    # conv2d with a CSR weight (out_channels, kh*kw*C_in) in tap-major column order: column (i*kw + j)*C_in + c
    # holds w[o, c, i, j]; grouped convs store their block-diagonal embedding. x: (N, C_in, H, W). Epilogue:
    # residual (the output's shape) added after the bias, then the ReLU: relu?(conv + bias + residual), capped
    # at relu_max (with relu only; 6: ReLU6).
    "csr_conv2d": "csr_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int out_channels, int[2] kernel_size, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
    "bool relu=False, Tensor? residual=None, float? relu_max=None) -> Tensor",
    # conv2d with a BSR weight (out_channels, kh*kw*C_in) in the same tap-major column order; values
    # (nnz_blocks, bh, bw), blocks past the weight's edge zero-padded. x: (N, C_in, H, W). Epilogue as
    # csr_conv2d's.
    "bsr_conv2d": "bsr_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int out_channels, int[2] kernel_size, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
    "bool relu=False, Tensor? residual=None, float? relu_max=None) -> Tensor",
    # conv2d with a 2:4 weight (out_channels, kh*kw*C_in) in the same tap-major column order, stored as
    # sparse24_linear's (values (K4/2, out_channels), meta (K4/8, out_channels) uint8, K4 = kh*kw*C_in rounded
    # up to a multiple of 8). x: (N, C_in, H, W). Epilogue as csr_conv2d's.
    "sparse24_conv2d": "sparse24_conv2d(Tensor x, Tensor values, Tensor meta, int out_channels, "
    "int[2] kernel_size, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, bool relu=False, "
    "Tensor? residual=None, float? relu_max=None) -> Tensor",
    # conv2d over the input channels in_index (gathered inside the kernel) with weight (C_out_kept,
    # C_in_kept / groups, kh, kw); relu fused; out_index scatters into an out_channels-wide zero output;
    # max_pool: [] or (kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w) of a max pool fused after
    # (dilation 1, floor mode); relu_max: the ReLU's cap (6: ReLU6), with relu only; residual: a tensor of the
    # output's shape added before the ReLU (not with max_pool).
    "pruned_conv2d": "pruned_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? in_index, Tensor? out_index, "
    "int out_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
    "int[] max_pool=[], float? relu_max=None, Tensor? residual=None) -> Tensor",
    # F.max_pool2d(x, kernel_size, stride, padding) with dilation 1 and floor mode, in x's memory format: the
    # kernel of pruned_conv2d's fused max pool on its own (ATen's NCHW max pool is many times slower on the CPU).
    "max_pool2d": "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor",
    # private: the CUDA kernel of csrc/cuda/pruned_conv2d.cu, called by pruned_conv2d's router (which checks the
    # arguments first); registered for CUDA only, by pyprune._C when built with CUDA.
    "_pruned_conv2d_cuda": "_pruned_conv2d_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? in_index, "
    "Tensor? out_index, int out_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "bool relu) -> Tensor",
    # private: the values' gradient of bsr_linear on CUDA (nnz_blocks, bh, bw), each stored block of
    # grad^T @ x computed alone (SDDMM); bsr_linear's autograd calls it for CUDA tensors, its router picks the
    # Triton kernel or the dense-sampled reference.
    "_bsr_linear_grad_values": "_bsr_linear_grad_values(Tensor grad, Tensor x, Tensor crow_indices, "
    "Tensor col_indices, int bh, int bw) -> Tensor",
    # private: the weight gradient of a conv at the entries (rows[e], cols[e]) of its tap-major (C_out,
    # kh*kw*C_in) weight only; grad: the output's gradient (N, C_out, OH, OW). The backward of csr_conv2d and
    # bsr_conv2d calls it for the values' gradient of a sparse weight on the CPU.
    "_conv2d_weight_sampled": "_conv2d_weight_sampled(Tensor x, Tensor grad, Tensor rows, Tensor cols, "
    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
    # private: the CUDA kernel of csrc/cuda/csr_linear.cu, called by csr_linear's router after its checks.
    "_csr_linear_cuda": "_csr_linear_cuda(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int out_features, Tensor? bias) -> Tensor",
    # private: the CUDA kernel of csrc/cuda/bsr_linear.cu (fp16 / bf16 on tensor cores, block sides 16, 32 or
    # 64), called by bsr_linear's router after its checks.
    "_bsr_linear_cuda": "_bsr_linear_cuda(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "int out_features, Tensor? bias) -> Tensor",
}

for _schema in SCHEMAS.values():
    lib.define(_schema)

from .. import _extension

__all__ = ["SCHEMAS", "_extension", "lib"]
