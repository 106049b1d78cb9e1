//! YOLOv8 detection network in `candle-nn`: Conv+BN+SiLU, C2f, SPPF, FPN/PAN neck and the
//! decoupled head with DFL.
//!
//! One private struct per block, each with `load(vb)` and `forward`. Channel counts are never
//! computed from size multipliers: every layer reads its shape from its weights, so sizes
//! n/s/m/l/x and any class count load the same way, and a file that does not hold a YOLOv8
//! fails with the name of the first missing tensor. Weights use the naming of the public
//! `lmz/candle-yolo-v8` safetensors (`net.*`, `fpn.*`, `head.*`); the checkpoint importer
//! writes the same names.
//!
//! BatchNorm is folded into the preceding convolution at load time, with the epsilon the model
//! was trained with (Ultralytics uses 1e-3).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::{FusedConv, MaxPoolSame};

/// Model size, recognised from the width of the first convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ModelSize {
    N,
    S,
    M,
    L,
    X,
    /// A width none of the stock sizes has (custom scaling); still loads.
    Custom(usize),
}

impl ModelSize {
    fn from_stem_width(c: usize) -> Self {
        match c {
            16 => Self::N,
            32 => Self::S,
            48 => Self::M,
            64 => Self::L,
            80 => Self::X,
            other => Self::Custom(other),
        }
    }
}

impl std::fmt::Display for ModelSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::N => f.write_str("n"),
            Self::S => f.write_str("s"),
            Self::M => f.write_str("m"),
            Self::L => f.write_str("l"),
            Self::X => f.write_str("x"),
            Self::Custom(w) => write!(f, "custom(width {w})"),
        }
    }
}

/// What every block's `load` needs besides its weights.
#[derive(Debug, Clone, Copy)]
struct Cx {
    /// BatchNorm epsilon the model was trained with.
    eps: f64,
    /// Use our fused GEMM convolution on CPU (false: Candle's stock `conv2d`, the reference).
    fused: bool,
}

/// A convolution with its BatchNorm folded in and its activation fused.
#[derive(Debug)]
enum ConvImpl {
    /// CPU: our tiled GEMM custom op.
    Cpu(FusedConv),
    /// Any other device: Candle's own conv kernel, then bias and SiLU.
    Device {
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        pad: usize,
        silu: bool,
    },
}

impl ConvImpl {
    fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        dims: [usize; 4],
        stride: usize,
        silu: bool,
        device: &Device,
        fused: bool,
    ) -> Result<Self> {
        let [c_out, c_in, k, k2] = dims;
        if k != k2 {
            candle_core::bail!("non-square kernel {k}x{k2}")
        }
        let pad = k / 2;
        if device.is_cpu() && fused {
            return Ok(Self::Cpu(FusedConv {
                weight,
                bias,
                c_in,
                c_out,
                k,
                stride,
                pad,
                silu,
            }));
        }
        Ok(Self::Device {
            weight: Tensor::from_vec(weight, (c_out, c_in, k, k), device)?,
            bias: Tensor::from_vec(bias, (1, c_out, 1, 1), device)?,
            stride,
            pad,
            silu,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Cpu(op) => xs.contiguous()?.apply_op1_no_bwd(op),
            Self::Device {
                weight,
                bias,
                stride,
                pad,
                silu,
            } => {
                let ys = xs
                    .conv2d(weight, *pad, *stride, 1, 1)?
                    .broadcast_add(bias)?;
                if *silu {
                    candle_nn::ops::silu(&ys)
                } else {
                    Ok(ys)
                }
            }
        }
    }
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Conv2d (no bias) + BatchNorm2d + SiLU, folded into one fused convolution.
#[derive(Debug)]
struct ConvBlock {
    conv: ConvImpl,
}

impl ConvBlock {
    fn load(vb: VarBuilder, stride: usize, cx: Cx) -> Result<Self> {
        let w = vb.pp("conv").get_unchecked("weight")?;
        let dims: [usize; 4] = w.dims4()?.into();
        let c_out = dims[0];
        let bn = vb.pp("bn");
        let gamma = to_f32_vec(&bn.get(c_out, "weight")?)?;
        let beta = to_f32_vec(&bn.get(c_out, "bias")?)?;
        let mean = to_f32_vec(&bn.get(c_out, "running_mean")?)?;
        let var = to_f32_vec(&bn.get(c_out, "running_var")?)?;
        let mut weight = to_f32_vec(&w)?;
        let per_out = weight.len() / c_out;
        let mut bias = vec![0f32; c_out];
        for co in 0..c_out {
            let scale = gamma[co] as f64 / (var[co] as f64 + cx.eps).sqrt();
            for v in &mut weight[co * per_out..(co + 1) * per_out] {
                *v = (*v as f64 * scale) as f32;
            }
            bias[co] = (beta[co] as f64 - mean[co] as f64 * scale) as f32;
        }
        Ok(Self {
            conv: ConvImpl::new(weight, bias, dims, stride, true, vb.device(), cx.fused)?,
        })
    }

    fn c_out(&self) -> usize {
        match &self.conv {
            ConvImpl::Cpu(op) => op.c_out,
            ConvImpl::Device { weight, .. } => weight.dims()[0],
        }
    }
}

impl Module for ConvBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// A plain Conv2d with bias and no activation (the head's last 1x1 layers).
#[derive(Debug)]
struct PlainConv {
    conv: ConvImpl,
}

impl PlainConv {
    fn load(vb: VarBuilder, cx: Cx) -> Result<Self> {
        let w = vb.get_unchecked("weight")?;
        let dims: [usize; 4] = w.dims4()?.into();
        let bias = to_f32_vec(&vb.get(dims[0], "bias")?)?;
        Ok(Self {
            conv: ConvImpl::new(to_f32_vec(&w)?, bias, dims, 1, false, vb.device(), cx.fused)?,
        })
    }
}

impl Module for PlainConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

#[derive(Debug)]
struct Bottleneck {
    cv1: ConvBlock,
    cv2: ConvBlock,
    residual: bool,
}

impl Bottleneck {
    fn load(vb: VarBuilder, c_in: usize, shortcut: bool, cx: Cx) -> Result<Self> {
        let cv1 = ConvBlock::load(vb.pp("cv1"), 1, cx)?;
        let cv2 = ConvBlock::load(vb.pp("cv2"), 1, cx)?;
        let residual = shortcut && c_in == cv2.c_out();
        Ok(Self { cv1, cv2, residual })
    }
}

impl Module for Bottleneck {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.cv2.forward(&self.cv1.forward(xs)?)?;
        if self.residual {
            xs + ys
        } else {
            Ok(ys)
        }
    }
}

/// CSP bottleneck with two convolutions ("C2f"); the number of bottlenecks is read from the
/// weights.
#[derive(Debug)]
struct C2f {
    cv1: ConvBlock,
    cv2: ConvBlock,
    bottleneck: Vec<Bottleneck>,
}

impl C2f {
    fn load(vb: VarBuilder, shortcut: bool, cx: Cx) -> Result<Self> {
        let cv1 = ConvBlock::load(vb.pp("cv1"), 1, cx)?;
        let cv2 = ConvBlock::load(vb.pp("cv2"), 1, cx)?;
        let hidden = cv1.c_out() / 2;
        let mut bottleneck = Vec::new();
        while vb.contains_tensor(&format!("bottleneck.{}.cv1.conv.weight", bottleneck.len())) {
            let b = Bottleneck::load(
                vb.pp(format!("bottleneck.{}", bottleneck.len())),
                hidden,
                shortcut,
                cx,
            )?;
            bottleneck.push(b);
        }
        if bottleneck.is_empty() {
            candle_core::bail!("{}: C2f block has no bottleneck weights", vb.prefix())
        }
        Ok(Self {
            cv1,
            cv2,
            bottleneck,
        })
    }
}

impl Module for C2f {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.cv1.forward(xs)?;
        let c = ys.dim(1)? / 2;
        let mut parts = vec![ys.narrow(1, 0, c)?, ys.narrow(1, c, c)?];
        for m in &self.bottleneck {
            let last = parts
                .last()
                .ok_or_else(|| candle_core::Error::Msg("empty C2f".into()))?;
            let next = m.forward(last)?;
            parts.push(next);
        }
        self.cv2.forward(&Tensor::cat(&parts, 1)?)
    }
}

/// Spatial pyramid pooling, fast: three chained 5x5 max-pools.
#[derive(Debug)]
struct Sppf {
    cv1: ConvBlock,
    cv2: ConvBlock,
    pool: MaxPoolSame,
}

impl Sppf {
    fn load(vb: VarBuilder, cx: Cx) -> Result<Self> {
        Ok(Self {
            cv1: ConvBlock::load(vb.pp("cv1"), 1, cx)?,
            cv2: ConvBlock::load(vb.pp("cv2"), 1, cx)?,
            pool: MaxPoolSame { k: 5 },
        })
    }

    fn pool(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() {
            return xs.apply_op1_no_bwd(&self.pool);
        }
        // Other devices: pad with a large negative value so that padding never wins the max.
        let r = self.pool.k / 2;
        let (_, _, h, w) = xs.dims4()?;
        let padded = (xs.pad_with_zeros(2, r, r)?.pad_with_zeros(3, r, r)? - 1e4)?;
        let mask = (Tensor::ones_like(xs)?
            .pad_with_zeros(2, r, r)?
            .pad_with_zeros(3, r, r)?
            * 1e4)?;
        let padded = (padded + mask)?;
        let out = padded.max_pool2d_with_stride((self.pool.k, self.pool.k), (1, 1))?;
        out.narrow(2, 0, h)?.narrow(3, 0, w)
    }
}

impl Module for Sppf {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x1 = self.cv1.forward(xs)?;
        let x2 = self.pool(&x1)?;
        let x3 = self.pool(&x2)?;
        let x4 = self.pool(&x3)?;
        self.cv2.forward(&Tensor::cat(&[&x1, &x2, &x3, &x4], 1)?)
    }
}

/// Backbone (`net.*`): the stem, four stages and SPPF. Returns the P3, P4 and P5 features.
#[derive(Debug)]
struct DarkNet {
    b1_0: ConvBlock,
    b1_1: ConvBlock,
    b2_0: C2f,
    b2_1: ConvBlock,
    b2_2: C2f,
    b3_0: ConvBlock,
    b3_1: C2f,
    b4_0: ConvBlock,
    b4_1: C2f,
    b5: Sppf,
}

impl DarkNet {
    fn load(vb: VarBuilder, cx: Cx) -> Result<Self> {
        Ok(Self {
            b1_0: ConvBlock::load(vb.pp("b1.0"), 2, cx)?,
            b1_1: ConvBlock::load(vb.pp("b1.1"), 2, cx)?,
            b2_0: C2f::load(vb.pp("b2.0"), true, cx)?,
            b2_1: ConvBlock::load(vb.pp("b2.1"), 2, cx)?,
            b2_2: C2f::load(vb.pp("b2.2"), true, cx)?,
            b3_0: ConvBlock::load(vb.pp("b3.0"), 2, cx)?,
            b3_1: C2f::load(vb.pp("b3.1"), true, cx)?,
            b4_0: ConvBlock::load(vb.pp("b4.0"), 2, cx)?,
            b4_1: C2f::load(vb.pp("b4.1"), true, cx)?,
            b5: Sppf::load(vb.pp("b5.0"), cx)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x1 = self.b1_1.forward(&self.b1_0.forward(xs)?)?;
        let x2 = self
            .b2_2
            .forward(&self.b2_1.forward(&self.b2_0.forward(&x1)?)?)?;
        let x3 = self.b3_1.forward(&self.b3_0.forward(&x2)?)?;
        let x4 = self.b4_1.forward(&self.b4_0.forward(&x3)?)?;
        let x5 = self.b5.forward(&x4)?;
        Ok((x2, x3, x5))
    }
}

fn upsample2(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    xs.upsample_nearest2d(2 * h, 2 * w)
}

/// FPN (top-down) + PAN (bottom-up) neck (`fpn.*`).
#[derive(Debug)]
struct Neck {
    n1: C2f,
    n2: C2f,
    n3: ConvBlock,
    n4: C2f,
    n5: ConvBlock,
    n6: C2f,
}

impl Neck {
    fn load(vb: VarBuilder, cx: Cx) -> Result<Self> {
        Ok(Self {
            n1: C2f::load(vb.pp("n1"), false, cx)?,
            n2: C2f::load(vb.pp("n2"), false, cx)?,
            n3: ConvBlock::load(vb.pp("n3"), 2, cx)?,
            n4: C2f::load(vb.pp("n4"), false, cx)?,
            n5: ConvBlock::load(vb.pp("n5"), 2, cx)?,
            n6: C2f::load(vb.pp("n6"), false, cx)?,
        })
    }

    fn forward(&self, p3: &Tensor, p4: &Tensor, p5: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.n1.forward(&Tensor::cat(&[&upsample2(p5)?, p4], 1)?)?;
        let h1 = self.n2.forward(&Tensor::cat(&[&upsample2(&x)?, p3], 1)?)?;
        let h2 = self
            .n4
            .forward(&Tensor::cat(&[&self.n3.forward(&h1)?, &x], 1)?)?;
        let h3 = self
            .n6
            .forward(&Tensor::cat(&[&self.n5.forward(&h2)?, p5], 1)?)?;
        Ok((h1, h2, h3))
    }
}

/// One branch of the decoupled head: two 3x3 ConvBlocks and a 1x1 projection.
#[derive(Debug)]
struct HeadBranch {
    c0: ConvBlock,
    c1: ConvBlock,
    out: PlainConv,
}

impl HeadBranch {
    fn load(vb: VarBuilder, cx: Cx) -> Result<Self> {
        Ok(Self {
            c0: ConvBlock::load(vb.pp("0"), 1, cx)?,
            c1: ConvBlock::load(vb.pp("1"), 1, cx)?,
            out: PlainConv::load(vb.pp("2"), cx)?,
        })
    }
}

impl Module for HeadBranch {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.c1.forward(&self.c0.forward(xs)?)?)
    }
}

/// Decoupled detection head (`head.*`): per level, a box branch (`cv2`, 4 x reg_max DFL bins)
/// and a class branch (`cv3`, one logit per class).
#[derive(Debug)]
struct Head {
    cv2: Vec<HeadBranch>,
    cv3: Vec<HeadBranch>,
}

impl Head {
    fn load(vb: VarBuilder, cx: Cx) -> Result<Self> {
        let mut cv2 = Vec::new();
        let mut cv3 = Vec::new();
        for i in 0..3 {
            cv2.push(HeadBranch::load(vb.pp(format!("cv2.{i}")), cx)?);
            cv3.push(HeadBranch::load(vb.pp(format!("cv3.{i}")), cx)?);
        }
        Ok(Self { cv2, cv3 })
    }
}

/// Raw head output of one pyramid level.
#[derive(Debug, Clone)]
pub struct LevelOutput {
    /// Box branch, `[4 * reg_max, h, w]` DFL logits.
    pub boxes: Vec<f32>,
    /// Class branch, `[num_classes, h, w]` logits (before sigmoid).
    pub classes: Vec<f32>,
    pub h: usize,
    pub w: usize,
    /// Pixels of the network input per cell of this level.
    pub stride: usize,
}

/// The YOLOv8 detection network.
#[derive(Debug)]
pub struct YoloV8 {
    net: DarkNet,
    fpn: Neck,
    head: Head,
    /// Size recognised from the weights.
    pub size: ModelSize,
    /// Number of classes (output channels of the class branch).
    pub num_classes: usize,
    /// DFL bins per box side (16 for every stock YOLOv8).
    pub reg_max: usize,
    /// DFL projection weights (`head.dfl.conv.weight`; `0..reg_max` in every stock model).
    pub dfl: Vec<f32>,
}

impl YoloV8 {
    /// Loads the network; shapes come from the weights, `bn_eps` from the model's metadata.
    pub fn load(vb: VarBuilder, bn_eps: f64) -> Result<Self> {
        Self::load_with(
            vb,
            Cx {
                eps: bn_eps,
                fused: true,
            },
        )
    }

    fn load_with(vb: VarBuilder, cx: Cx) -> Result<Self> {
        let stem = vb.get_unchecked("net.b1.0.conv.weight")?;
        let size = ModelSize::from_stem_width(stem.dims4()?.0);
        let net = DarkNet::load(vb.pp("net"), cx)?;
        let fpn = Neck::load(vb.pp("fpn"), cx)?;
        let head = Head::load(vb.pp("head"), cx)?;
        let dfl_w = vb.get_unchecked("head.dfl.conv.weight")?;
        let reg_max = dfl_w.elem_count();
        let dfl = to_f32_vec(&dfl_w)?;
        let num_classes = vb.get_unchecked("head.cv3.0.2.weight")?.dims4()?.0;
        let box_ch = vb.get_unchecked("head.cv2.0.2.weight")?.dims4()?.0;
        if box_ch != 4 * reg_max {
            candle_core::bail!(
                "head box branch has {box_ch} channels, expected 4 x {reg_max} DFL bins"
            )
        }
        Ok(Self {
            net,
            fpn,
            head,
            size,
            num_classes,
            reg_max,
            dfl,
        })
    }

    /// Runs the network on a `[1, 3, S, S]` input in `0..1`, returning the three levels' raw
    /// outputs (strides 8, 16, 32).
    pub fn forward(&self, xs: &Tensor) -> Result<Vec<LevelOutput>> {
        let (_, _, in_h, _) = xs.dims4()?;
        let (p3, p4, p5) = self.net.forward(xs)?;
        let (h1, h2, h3) = self.fpn.forward(&p3, &p4, &p5)?;
        let mut out = Vec::with_capacity(3);
        for (i, feat) in [h1, h2, h3].iter().enumerate() {
            let boxes = self.head.cv2[i].forward(feat)?;
            let classes = self.head.cv3[i].forward(feat)?;
            let (_, _, h, w) = boxes.dims4()?;
            out.push(LevelOutput {
                boxes: to_f32_vec(&boxes)?,
                classes: to_f32_vec(&classes)?,
                h,
                w,
                stride: in_h / h,
            });
        }
        Ok(out)
    }
}

/// The same network run through Candle's stock `conv2d` on CPU instead of our fused GEMM path:
/// the reference the fast path is tested against. Returns the head outputs flattened like
/// [`YoloV8::forward`]'s (per level: boxes then classes).
pub fn reference_forward(
    tensors: &std::collections::HashMap<String, Tensor>,
    bn_eps: f64,
    xs: &Tensor,
) -> Result<Vec<f32>> {
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let model = YoloV8::load_with(
        vb,
        Cx {
            eps: bn_eps,
            fused: false,
        },
    )?;
    Ok(model
        .forward(xs)?
        .into_iter()
        .flat_map(|l| l.boxes.into_iter().chain(l.classes))
        .collect())
}
