"""Float64 GELU on explicit 8-lane AVX-512 vectors: forward and backward, with or
without a bias (the float64 path of ``kernels.activations`` where the CPU has AVX-512F;
float32 GELU on 16 lanes is a shorter version of its central pieces, ``gelu*_f32``);
float64 softmax has a leaner variant of the same table exp (``exp_softmax``, behind
``softmax_exp_f64`` and the row kernels; see there). At the end: softmax + cross-entropy and
layer norm (forward and backward) of short rows, float32 and float64, each row held in
up to 8 vectors (``softmax_row*``, ``ln_row``, ``ln_bwd_row``).

The scalar-style ``kernels._erf.normal_parts``, which LLVM vectorises on its own, costs
about 71 vector operations per 8 elements (a degree-11 exp, a division and a degree-20
polynomial); this machine issues about two 512-bit operations per cycle, so float64
GELU was compute-bound at 1.1 ns per element per core. Here ``Phi(-a) = exp(-a^2 / 2)
F(s) / (a + c)``, ``a = |x|``, takes about 50, using what LLVM's vectoriser cannot
express: ``vpermi2pd`` (any of 16 doubles per lane, one instruction) and ``vscalefpd``:

- ``exp(-a^2/2)``: ``-a^2/2 = k ln2/16 + r``; ``2^((k mod 16) / 16)`` from a 16-entry
  table, ``e^r`` by a degree-6 polynomial (``|r| <= ln2/32``), ``2^floor(k/16)`` by
  ``vscalefpd`` (subnormals and 0 with no branch). ``a^2`` is split exactly (FMA) and
  its low part folded into ``r``, so the lower tail keeps its accuracy.
- ``F = 0.5 erfcx(a / sqrt2) (a + c)``, ``c = 3 sqrt2``: ``s = (y + 1) S`` in [0, 16)
  for ``y = (a - c) / (a + c) = 1 - 2c / (a + c)``, so one division gives both ``s`` and
  the final ``1 / (a + c)``; one degree-8 polynomial per unit interval of ``s``, its 9
  coefficients looked up per lane (``kernels._erf_fit.fit_erfcx_pieces``; max rel.
  error 2.2e-16). (``vrcp14pd`` and two Newton steps instead of the division measured
  7% slower.)

Measured against mpmath: at most 8 ulp for ``x >= -36`` (the old path: 7); below that
the result is subnormal (the old path flushed it to 0). Each call does 32 elements as 4
vectors in lockstep, so their long dependency chains overlap (one core, in cache: 1, 2,
4 and 8 vectors per call took 0.88, 0.85, 0.76 and 0.83 ns per element; the old path
1.09); ``_tail`` variants take the last, partial block with masked loads and stores, so
every element goes through the same arithmetic wherever it sits. Callers must be
compiled with ``fastmath={"contract"}``: reassociation would undo the rounding tricks.

All four kernels take a cheaper road for ``|z| < 4.99``, where nearly all activations
are (``central_pieces``): ``Phi(-a)``, or for the backward ``R(a) = a phi(a) -
Phi(-a)`` (``GELU'(x) = 1 + R(|x|)`` for ``x >= 0``, ``-R(|x|)`` below), straight from
16 pieces of width 0.3125, a degree-12 polynomial each, its 13 coefficients looked up
per lane: no exp, no division, about 33 operations per 8 elements instead of 50. At
most 3 ulp against mpmath (mean 0.34; the path above has mean 0.73). Lanes outside
(and NaN) are put aside, their ``z``, ``dy`` and places appended to per-chunk buffers,
and finished 32 at a time by the path above (``gelu_wide_*``), so a lane's result
depends only on its value, never on its neighbours or on where the blocks fall. One
core, in cache, ns per element for ``N(0, 1)`` inputs: GELU 0.81 -> 0.55, backward
0.85 -> 0.59; for ``N(0, 3^2)`` (9.5% of lanes put aside) 0.80 -> 0.75 and 0.81 ->
0.86. The 13 ``vpermt2pd`` lookups per vector are the bottleneck now (with constants
in their place: 0.34).

The row and block kernels of softmax and layer norm (the second half) are written for
any vector width and take the CPU's (``row_lanes``): without AVX-512 they run on AVX2's
256-bit vectors, their permutes left to LLVM (``shufflevector``: ``vpermps``,
``vpermpd``, blends) and their exps from bits (``_exp_bits``) instead of ``vscalef`` and
``vpermi2pd``. float32 GELU runs on 8 lanes with its own 4-piece table, float64 GELU on
4 lanes with 128 pieces read from memory (``central_pieces_mem``); ``softmax_exp_f64``
and float64 GELU's full-range path stay AVX-512 only.
"""

from __future__ import annotations

import functools
import math
import struct

from llvmlite import ir
from numba.core import cgutils

from kernels._fastmath import (_EXP, _EXP5_F32, _LN2_HI, _LN2_LO, _LOG2E, EXP_MIN_F32,
                               LN2_HI_F32, LN2_LO_F32, ROUND_F32, ROUND_F64, hidden)
from kernels import _pieces_mem
from kernels._jit import intrinsic, types
from kernels._simd import (VEC_BITS, _compress_to, _elem_ptr, _host_has_avx512, _load,
                           _mask, _splat, _vec_name, elem_bytes, store_nt)

__all__ = ["AVAILABLE", "BLOCK", "BLOCK32", "gelu_bias_bwd_f32", "gelu_bias_bwd_f32_nt",
           "gelu_bias_bwd_f32_tail", "gelu_bias_f32", "gelu_bias_f32_nt", "gelu_bias_f32_tail",
           "gelu_bwd_f32", "gelu_bwd_f32_nt", "gelu_bwd_f32_tail", "gelu_f32", "gelu_f32_nt",
           "gelu_f32_tail", "gelu_bias_bwd_f64", "gelu_bias_bwd_f64_nt",
           "gelu_bias_bwd_f64_staged", "gelu_bias_bwd_f64_tail", "gelu_bias_f64",
           "gelu_bias_f64_nt", "gelu_bias_f64_staged", "gelu_bias_f64_tail", "gelu_bwd_f64",
           "gelu_bwd_f64_nt", "gelu_bwd_f64_staged", "gelu_bwd_f64_tail", "gelu_f64",
           "gelu_f64_nt", "gelu_f64_staged", "gelu_f64_tail", "gelu_wide_bwd_f64",
           "gelu_wide_bwd_f64_tail", "gelu_wide_f64", "gelu_wide_f64_tail", "ln_block", "ln_bwd_block", "ln_bwd_row", "ln_row",
           "softmax_block", "softmax_exp_f64", "softmax_exp_f64_tail",
           "SHORT_ROW_VECTORS", "softmax_row1_f32", "softmax_row1_f64", "softmax_row2_f32",
           "softmax_row2_f64", "softmax_row4_f32", "softmax_row4_f64", "softmax_row8_f32",
           "softmax_row8_f64"]

# e^r on |r| <= 1.01 ln2/32, degree 6 (python -m kernels._erf_fit)
EXP16 = (1.0, 1.0000000000000024, 0.5000000000000007, 0.16666666662689536,
         0.04166666665956466, 0.00833349952335219, 0.0013889126302947898)
# ERFCX16[m][j]: coefficient of v^m on piece j (python -m kernels._erf_fit)
ERFCX16 = (
    (2.1213203435596424, 1.857033572508873, 1.6308692876801063, 1.4378150285002704,
     1.2732985254730145, 1.1332045106874025, 1.0138777132530479, 0.9121129249600104,
     0.8251337910360389, 0.7505625928251799, 0.6863836661753658, 0.6309031980320895,
     0.5827079669816596, 0.5406251911223375, 0.5036851037176299, 0.4710872921810063),
    (-0.2851231953910231, -0.24435474246532093, -0.20880975041452995, -0.17806109292545555,
     -0.15165783890507564, -0.12913923290498278, -0.11004820435167655, -0.09394358799911338,
     -0.08041034995529167, -0.0690673142338661, -0.059572148376209215, -0.05162365173645011,
     -0.04496164783050126, -0.03936496952262634, -0.03464811727095139, -0.030657165035897053),
    (0.021756926541270902, 0.01904410655361001, 0.01653659376009891, 0.014249758833883248,
     0.012192005043649182, 0.010364792866335444, 0.008763085288677773, 0.007376181901420129,
     0.006188862297232203, 0.0051827198246190385, 0.004337544587900655, 0.00363261592455993,
     0.003047790028505706, 0.0025643118617820013, 0.002165330840929123, 0.0018361445792309673),
    (-0.0009362240032819816, -0.0008710986973534237, -0.0007997204092798778,
     -0.000724369483881302, -0.0006473877374726908, -0.000571038245774314,
     -0.0004973677216452676, -0.00042808763914840966, -0.0003644891525151211,
     -0.0003074025412036916, -0.0002572048638821613, -0.00021387120478140884,
     -0.00017705751617941117, -0.00014619871389046982, -0.00012060552315162144,
     -9.954724250256528e-05),
    (1.5320104987991346e-05, 1.715500005600585e-05, 1.8438589014090898e-05,
     1.9138704867081985e-05, 1.925728910977323e-05, 1.8831670462592007e-05,
     1.7931916393887458e-05, 1.6654152619437782e-05, 1.5110527884435377e-05,
     1.341728612100705e-05, 1.168294515718047e-05, 9.998638763612442e-06,
     8.432162941288173e-06, 7.026308251554648e-06, 5.800991798216836e-06,
     4.757914272938722e-06),
    (4.18420809498607e-07, 3.1345140442007064e-07, 1.9889435605132281e-07,
     8.121245449893206e-08, -3.25225907819126e-08, -1.3536101182272006e-07,
     -2.2129472533790773e-07, -2.8602355812653667e-07, -3.275036956417027e-07,
     -3.461374206957333e-07, -3.445384769186658e-07, -3.2691917280768163e-07,
     -2.982550093859236e-07, -2.6344288314543244e-07, -2.2665025224632461e-07,
     -1.9096458057408336e-07),
    (-1.637783127947724e-08, -1.8457094586723332e-08, -1.9544035608344212e-08,
     -1.9485404160397734e-08, -1.8236189298596524e-08, -1.588385300686074e-08,
     -1.265247483781253e-08, -8.88036068477538e-09, -4.970763912457682e-09,
     -1.3239385662448117e-09, 1.733162609713508e-09, 3.999764140063043e-09,
     5.421237240752044e-09, 6.072217619301004e-09, 6.1125574057072925e-09,
     5.734386191992404e-09),
    (-3.616072809293769e-10, -2.334974121029604e-10, -7.676865382613709e-11,
     9.529961490692834e-11, 2.6479705029840825e-10, 4.1146986897848893e-10,
     5.162594219383139e-10, 5.654521639022942e-10, 5.542948403236369e-10,
     4.887185760992619e-10, 3.841874320862559e-10, 2.616958625685345e-10,
     1.4220925045319218e-10, 4.164284458690761e-11, -3.179875549842496e-11,
     -7.735785196048492e-11),
    (1.590566897457537e-11, 1.94292820483634e-11, 2.13091899821226e-11, 2.0980479944138836e-11,
     1.816044368052433e-11, 1.2999478938569169e-11, 6.1534552358823506e-12,
     -1.282663278619257e-12, -8.004137373455647e-12, -1.28436199218293e-11,
     -1.511590367091826e-11, -1.480910971761554e-11, -1.252557526539335e-11,
     -9.201725417671032e-12, -5.754239110919507e-12, -2.8220386299436045e-12),
)
# NORMAL_TAIL16[m][j]: coefficient of t^m on piece j (python -m kernels._erf_fit)
NORMAL_TAIL16 = (
    (0.43791798319170516, 0.31962417151711764, 0.21732773567808564, 0.1370323193049116,
     0.07982495082140524, 0.042829951702417116, 0.021114820317715284, 0.009545481536386156,
     0.0039507506607768085, 0.0014950687953494024, 0.0005167404839400355,
     0.00016297630075898362, 4.6869765016455215e-05, 1.2283023933861451e-05,
     2.9317849284740416e-06, 6.370561470021116e-07),
    (-0.39410198245666234, -0.3574349775195373, -0.2940179925240424, -0.21935078679126926,
     -0.1484201665251779, -0.09108252507607337, -0.05069505972497667, -0.02559084613085238,
     -0.011716343114668255, -0.004865057158683172, -0.001832197313865754,
     -0.0006258135563984128, -0.00019386799581302502, -5.446979040605382e-05,
     -1.3880135864086436e-05, -3.2078951113598653e-06),
    (0.030789217379426744, 0.08377382285614154, 0.11485077832970408, 0.11995746152647538,
     0.10435792958801571, 0.07827404498725055, 0.05148717003317943, 0.029989272809592637,
     0.015560768199168774, 0.007221569219920334, 0.0030059487180610026, 0.001124508734153398,
     0.0003786484293223145, 0.00011489721413776978, 3.144718281707083e-05,
     7.769120972824671e-06),
    (0.06408005867093149, 0.046482836431984136, 0.01909394189731371, -0.007176026716315649,
     -0.02418108507351945, -0.029664084094600307, -0.026411928089135926, -0.01916397836068548,
     -0.01182503965723589, -0.006335501680765592, -0.0029823901914016026,
     -0.0012427654950548758, -0.000460720476377937, -0.00015249590898023082,
     -4.5184993069267396e-05, -1.2009244052144821e-05),
    (-0.007634663521737585, -0.0194095112037298, -0.022871081915102953, -0.018030715449170082,
     -0.008891825543510283, -0.00029938803014329583, 0.0048311122272344555,
     0.006230681435782123, 0.005259104030855131, 0.003498535283706493, 0.0019455005008739389,
     0.0009291290021044485, 0.00038681426865910535, 0.000141685993312961,
     4.594492782510389e-05, 1.3247590473924808e-05),
    (-0.009373425565443839, -0.005152783789461437, 0.0007095152645042467, 0.0050206230118586,
     0.006127988695163323, 0.004552527249630147, 0.001999149871098959, -4.6035168932045865e-05,
     -0.0010201430678352386, -0.001126930072600038, -0.0008293761749861681,
     -0.00048139664599783003, -0.000233090575929698, -9.667317051043603e-05,
     -3.485984188185024e-05, -1.1032216664350471e-05),
    (0.0012620547602986115, 0.0029904960606506274, 0.0029570927885812916,
     0.0014888776567073528, -0.00025067061125041984, -0.0012641909643412174,
     -0.0013209438262504424, -0.0008127750369261427, -0.00024958803346912317,
     9.112423767799876e-05, 0.00019416502891743504, 0.0001644526658154879,
     0.00010017644121720429, 4.908185723953779e-05, 2.0200452710535156e-05,
     7.139871181163691e-06),
    (0.0010877131108194267, 0.00041317021086338164, -0.0004144987614631658,
     -0.0008303303362596046, -0.0006791645316631767, -0.0002315635092959494,
     0.00014531555418759642, 0.00027761487790935576, 0.00021615535220577685,
     9.551190387603679e-05, 7.720401325044444e-06, -2.7119700358510124e-05,
     -2.815315433911833e-05, -1.807187287690729e-05, -8.926204626056937e-06,
     -3.6271766569669413e-06),
    (-0.00015646454566056611, -0.00034461947665888684, -0.0002763529718205104,
     -4.6000883121239406e-05, 0.00014624195076287189, 0.00018519900212836385,
     0.00010463316929174824, 5.750558108695202e-06, -4.5028755595786355e-05,
     -4.5207181876161934e-05, -2.3969967390725022e-05, -5.437250964090712e-06,
     3.0134671886491686e-06, 4.271318861184781e-06, 2.891523938347874e-06,
     1.431155948886485e-06),
    (-0.00010303213025971138, -2.222052424690685e-05, 6.428618396289608e-05,
     8.63160377972631e-05, 4.317980200632884e-05, -1.2853995070118093e-05,
     -3.774261808156009e-05, -2.8487991529811798e-05, -7.725643175786674e-06,
     5.6260760983004745e-06, 7.9884763003335e-06, 4.807824462963577e-06,
     1.4292176688556218e-06, -2.451898142544072e-07, -5.879836258959663e-07,
     -4.1760335011860204e-07),
    (1.551759879501963e-05, 3.167397372032044e-05, 1.9542137582333188e-05,
     -5.351676776130273e-06, -1.9071143347317788e-05, -1.425271790265331e-05,
     -1.63432836583374e-06, 6.16558279993944e-06, 6.0546166686401175e-06,
     2.3481858968975334e-06, -4.905208835482819e-07, -1.2444801764990777e-06,
     -8.26148834669565e-07, -2.762375131574486e-07, 9.401945346011388e-09,
     7.506119626971203e-08),
    (8.165012431863763e-06, 4.725352716358366e-07, -6.605774432459458e-06,
     -6.5003500350178976e-06, -1.102087806932608e-06, 3.25407157458677e-06,
     3.3764562695774527e-06, 1.0209143749124411e-06, -8.208982037411353e-07,
     -1.0896155077953558e-06, -5.07946377888867e-07, 1.116489766991267e-08,
     1.753296658882371e-07, 1.2589749490161686e-07, 4.446719483360474e-08,
     1.2901429879156438e-09),
    (-1.2747531867277682e-06, -2.404441954263355e-06, -1.0443077347618951e-06,
     9.925261481890656e-07, 1.5650511207104334e-06, 6.099657631904582e-07,
     -4.453873240405849e-07, -6.626965296558925e-07, -2.7526881132091265e-07,
     9.124384435215107e-08, 1.7505199559662116e-07, 9.037885124666456e-08,
     5.455047228999997e-09, -2.3205886091716515e-08, -1.7398491929132015e-08,
     -6.16703660963923e-09),
)
# GELU_GRAD16[m][j]: the same for R(a) = a phi(a) - Phi(-a) (the backward pass)
GELU_GRAD16 = (
    (-0.37633954843285167, -0.15207652580483452, 0.012373820981322526, 0.10288260374803916,
     0.12889090835462616, 0.11371813827208399, 0.08185951974864358, 0.050433064082799114,
     0.02717078573756074, 0.012948069644491265, 0.00549515695218197, 0.0020860411675478123,
     0.0007104270936281738, 0.0002175114043416781, 5.996258070566761e-05,
     1.490118579864723e-05),
    (0.7785823344822538, 0.6363319961114419, 0.4085816439079223, 0.17629462649337363,
     0.0033336560840616105, -0.08690197949152703, -0.1077765088098381, -0.08939302403326072,
     -0.05923389482874761, -0.03314795292591064, -0.016062143834543824, -0.0068307794139307225,
     -0.002570454862454532, -0.0008605056634753248, -0.0002572298225515315,
     -6.884756920151927e-05),
    (-0.12240517964027957, -0.31668795730090227, -0.3893037613109403, -0.33632604691651447,
     -0.21105983611013723, -0.08186670134897006, 0.006486176693632958, 0.04477890441979213,
     0.047548480171092866, 0.03476085418455794, 0.020340057292426453, 0.010025039291099972,
     0.004263122794586879, 0.0015853347056177238, 0.0005198919510841719,
     0.00015120196471428012),
    (-0.2515485699826357, -0.1495385122209439, -0.004903636604562316, 0.10758848695537925,
     0.14674085897632438, 0.12071462908563879, 0.0663949255102646, 0.018243274982283803,
     -0.008577821698893052, -0.016203099770952446, -0.013605133308363842,
     -0.008385167425031755, -0.004201091042286723, -0.0017809675012353174,
     -0.0006520118445529648, -0.00020863508922372372),
    (0.045496306331799956, 0.10912439302516506, 0.11158386557302317, 0.06269704514923274,
     0.0013717072048484277, -0.03762634090011981, -0.044459427014089975, -0.030613932543129285,
     -0.012746745034971488, -0.0007648081535851833, 0.003879450366531939, 0.00400445097236816,
     0.002618478967900368, 0.0013307697238968436, 0.0005600686534933951,
     0.0002009485449566273),
    (0.05505737705376663, 0.02250593256637644, -0.018118464032399393, -0.039894497692649224,
     -0.03465289888888321, -0.014278194178642362, 0.004104103655612081, 0.011705859970553156,
     0.010098667690645957, 0.005138429952016222, 0.0011536330430539322, -0.0006576307307089634,
     -0.000949341885463256, -0.0006623454883070277, -0.0003400407567696768,
     -0.00014130920621388836),
    (-0.010024069558485067, -0.02228918717222904, -0.01843285931571379, -0.004064926858526264,
     0.00844022010504407, 0.011635335089330654, 0.007180401162889308, 0.00113480619552064,
     -0.002272022270571203, -0.002622726374974395, -0.0015364831772011513,
     -0.0004689387215469825, 6.85777118777727e-05, 0.00019011199381585914,
     0.0001417248873031655, 7.300486290871826e-05),
    (-0.008506124086887728, -0.0020130386692066202, 0.0050431960496313015,
     0.007045150349518234, 0.003788094341843195, -0.0006939781385120427, -0.002862813411169337,
     -0.0023287420075086473, -0.0007723817844470097, 0.00030957533272104215,
     0.0005674484387856142, 0.000373278573297783, 0.00013105438645992441,
     4.179708018363015e-07, -3.3408106483015584e-05, -2.643988003520822e-05),
    (0.0015530717255944526, 0.003195317536700301, 0.0020351555097342508,
     -0.0004356744522993274, -0.0018626690937768608, -0.0014679441729697827,
     -0.000251708847412351, 0.0005491611137490448, 0.0005899433552700125,
     0.00025653930034737644, -2.0179383476908374e-05, -0.00010656579660456616,
     -7.736594800680518e-05, -2.913219579956144e-05, -2.0452973354029246e-06,
     5.324259771399497e-06),
    (0.0010060697027383463, 7.373439042760594e-05, -0.0007955295123768142,
     -0.0008046233244197448, -0.00016361164234039737, 0.0003735055183813195,
     0.0004106224143208357, 0.0001403749648007488, -8.356826713288393e-05,
     -0.00012597226448970018, -6.378979133610448e-05, -3.354975494889489e-06,
     1.7979198802228154e-05, 1.4105697739902202e-05, 5.453843667948825e-06,
     5.402691673463889e-07),
    (-0.00018480255438349554, -0.000350826595701424, -0.00015783446464573831,
     0.00013743235703084604, 0.00022671706733836186, 9.479263052080937e-05,
     -5.776302946100454e-05, -9.404435415169615e-05, -4.235074478989433e-05,
     9.897523010997267e-06, 2.3705359360315123e-05, 1.3167131465287015e-05,
     1.5062668769559686e-06, -2.8087517554093656e-06, -2.308253395176151e-06,
     -8.850926909195385e-07),
    (-9.550230402370729e-05, 7.83982085981391e-06, 8.897321796508709e-05,
     6.492668759729252e-05, -1.3159369368625572e-05, -5.157990224506212e-05,
     -2.9643768811739447e-05, 6.37268116977455e-06, 1.86076642396274e-05,
     9.820477341236565e-06, -7.933045922990058e-07, -4.027680313077456e-06,
     -2.3586231820077535e-06, -3.364554641133728e-07, 4.118950468860108e-07,
     3.427747730653462e-07),
    (1.769413297681535e-05, 3.090585854479162e-05, 8.203914377042759e-06,
     -1.821387937132279e-05, -1.865617261988959e-05, -1.0039532025203098e-06,
     1.0227816054531725e-05, 7.162756632880238e-06, -3.599088677477203e-07,
     -3.3430707073171714e-06, -1.9173141376988007e-06, 2.837718766452348e-08,
     6.391628243158894e-07, 3.7516289039025405e-07, 5.370534018010212e-08,
     -5.865907972714676e-08),
)
# ln2/16 in two parts (fdlibm's split of ln2, 32 + 53 bits): k * _LN2_16_HI is exact
_LN2_16_HI = 0.6931471803691238 / 16
_LN2_16_LO = 1.9082149292705877e-10 / 16
_MAGIC = 1.5 * 2.0 ** 52  # x + _MAGIC rounds x to an integer held in the low bits
_C = 3.0 * math.sqrt(2.0)  # the map's centre, in units of a
_A_FIT = 27.5 * math.sqrt(2.0)  # the fit covers a <= _A_FIT (s < 16)
# a is clamped here: exp(-a^2 / 2) is exactly 0 (so -inf gives NaN, as -inf * 0 does)
_A_CLAMP = 38.7
_S_SCALE = 16.0 / (1.0 + (_A_FIT - _C) / (_A_FIT + _C))
_POW2_16 = tuple(2.0 ** (j / 16) for j in range(16))
# the forward's central pieces: 16 of width _H cover a < 16 _H = 5; lanes at or past
# _A_CENTRAL (or NaN) are put aside (1 / _H is inexact: the margin keeps the piece <= 15)
_H = 0.3125
_A_CENTRAL = 4.99
_INV_SQRT_2PI = 0.3989422804014327


def _variant_name(bias: bool, backward: bool, dt: str, masked: bool, nt: bool) -> str:
    """``gelu[_bias][_bwd]_{dt}[_tail|_nt]``: the name a GELU intrinsic is exported as."""
    return ("gelu" + ("_bias" if bias else "") + ("_bwd" if backward else "") + "_" + dt
            + ("_tail" if masked else "") + ("_nt" if nt else ""))


# numba compiles for a CPU with AVX-512F (the host, unless NUMBA_CPU_NAME names another
# target, as for a portable cache, or NUMBA_CPU_FEATURES lists the features)
AVAILABLE = _host_has_avx512()

_F64 = ir.DoubleType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_V8 = ir.VectorType(_F64, 8)
_I8V = ir.VectorType(_I64, 8)
_F32 = ir.FloatType()
_V16 = ir.VectorType(_F32, 16)


def row_lanes(f32: bool) -> int:
    """Lanes per vector of the row and block kernels (softmax, layer norm: the second half
    of this module), which are written for any width and take the host's
    (``kernels._simd.VEC_BITS``): 16 float32 / 8 float64 with AVX-512, 8 / 4 with AVX2.
    Only their permutes and exps pick instructions by width (``_permute1``,
    ``_permute2``, ``_exp_softmax_f32``, ``_exp_nonpos_f64``)."""
    return VEC_BITS // (32 if f32 else 64)


def _row_vty(f32: bool) -> ir.VectorType:
    return ir.VectorType(_F32 if f32 else _F64, row_lanes(f32))


class _Vec:
    """Arithmetic on <8 x double> for one codegen call (keeps the math below readable).

    Every operand may also be a list of vectors (a few independent vectors handled in
    lockstep: the instructions of their long dependency chains come out interleaved, so
    the core overlaps them); constants are plain vectors shared by all."""

    def __init__(self, builder, width: int = 1):
        self.b = builder
        self.width = width

    def _fn(self, name, ret, args):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, args), name)

    def _map(self, op, *args):
        if not any(isinstance(a, list) for a in args):
            return op(*args)
        return [op(*(a[q] if isinstance(a, list) else a for a in args))
                for q in range(self.width)]

    def const(self, v):
        return ir.Constant(_V8, [float(v)] * 8)

    def table(self, vals):
        return ir.Constant(_V8, [float(v) for v in vals])

    def fma(self, a, b, c):
        fn = self._fn("llvm.fma.v8f64", _V8, [_V8] * 3)
        return self._map(lambda x, y, z: self.b.call(fn, [x, y, z]), a, b, c)

    def add(self, a, b):
        return self._map(self.b.fadd, a, b)

    def sub(self, a, b):
        return self._map(self.b.fsub, a, b)

    def mul(self, a, b):
        return self._map(self.b.fmul, a, b)

    def div(self, a, b):
        return self._map(self.b.fdiv, a, b)

    def neg(self, a):
        return self._map(self.b.fneg, a)

    def fabs(self, a):
        fn = self._fn("llvm.fabs.v8f64", _V8, [_V8])
        return self._map(lambda x: self.b.call(fn, [x]), a)

    def max_x86(self, a, b):
        """``vmaxpd a, b``: ``b`` when ``a > b`` is false, so ``b`` where both are zeros of
        either sign or either is NaN (``max_x86(0, z)`` keeps ``z = -0.0``)."""
        fn = self._fn("llvm.x86.avx512.max.pd.512", _V8, [_V8, _V8, _I32])
        return self._map(lambda x, y: self.b.call(fn, [x, y, ir.Constant(_I32, 4)]), a, b)

    def minnum(self, a, b):
        fn = self._fn("llvm.minnum.v8f64", _V8, [_V8, _V8])
        return self._map(lambda x, y: self.b.call(fn, [x, y]), a, b)

    def select_lt(self, p, q, a, b):
        """``a`` where ``p < q`` (ordered: false for NaN), else ``b``."""
        return self._map(lambda pp, qq, x, y: self.b.select(
            self.b.fcmp_ordered("<", pp, qq), x, y), p, q, a, b)

    def select_neg(self, z, a, b):
        """``a`` where ``z < 0``, else ``b``."""
        return self.select_lt(z, self.const(0.0), a, b)

    def _hreduce(self, a, op):
        """``op`` over all lanes of all vectors in ``a`` (a tree: one double)."""
        acc = a[0] if isinstance(a, list) else a
        for x in (a[1:] if isinstance(a, list) else []):
            acc = op(acc, x)
        for half in (4, 2, 1):
            mask = ir.Constant(ir.VectorType(_I32, 8), [(i + half) % 8 for i in range(8)])
            acc = op(acc, self.b.shuffle_vector(acc, acc, mask))
        return self.b.extract_element(acc, ir.Constant(_I32, 0))

    def hsum(self, a):
        """The sum of all lanes of all vectors in ``a`` (a tree: one double)."""
        return self._hreduce(a, self.b.fadd)

    def hmax(self, a):
        """The max over all lanes of all vectors in ``a`` (``vmaxpd``; where a NaN meets a
        number, either may come out)."""
        return self._hreduce(a, self.max_x86)

    def lookup16(self, tab, idx_bits):
        """``tab[idx & 15]`` per lane (vpermi2pd over two 8-entry halves)."""
        fn = self._fn("llvm.x86.avx512.vpermi2var.pd.512", _V8, [_V8, _I8V, _V8])
        lo, hi = self.table(tab[:8]), self.table(tab[8:])
        return self._map(lambda i: self.b.call(fn, [lo, i, hi]), idx_bits)

    def scalef(self, a, e):
        """``a * 2^floor(e)`` (vscalefpd)."""
        fn = self._fn("llvm.x86.avx512.mask.scalef.pd.512", _V8,
                      [_V8, _V8, _V8, ir.IntType(8), _I32])
        return self._map(lambda x, y: self.b.call(
            fn, [x, y, x, ir.Constant(ir.IntType(8), -1), ir.Constant(_I32, 4)]), a, e)

    def trunc_int(self, a):
        return self._map(lambda x: self.b.fptosi(x, _I8V), a)

    def int_to_float(self, a):
        return self._map(lambda x: self.b.sitofp(x, _V8), a)

    def bits(self, a):
        return self._map(lambda x: self.b.bitcast(x, _I8V), a)

    def estrin(self, coefs, u):
        """Estrin's scheme: depth log2(degree) instead of Horner's degree."""
        terms, x = list(coefs), u
        while len(terms) > 1:
            nxt = [self.fma(terms[i + 1], x, terms[i]) for i in range(0, len(terms) - 1, 2)]
            if len(terms) % 2:
                nxt.append(terms[-1])
            terms, x = nxt, self.mul(x, x)
        return terms[0]



def _exp_reduce(v: _Vec, w):
    """``w = k ln2/16 + r`` (|r| <= ln2/32): ``(kf, kd, r)``, ``kf`` holding ``k`` in its
    low bits (for the table lookup), ``kd = k`` as a double. ``|w| < 2^47``."""
    kf = v.fma(w, v.const(16.0 / math.log(2)), v.const(_MAGIC))
    kd = v.sub(kf, v.const(_MAGIC))
    r = v.fma(kd, v.const(-_LN2_16_HI), w)
    return kf, kd, v.fma(kd, v.const(-_LN2_16_LO), r)


def _exp_finish(v: _Vec, kf, kd, r):
    """``2^(k/16) e^r``: table, degree-6 polynomial, ``vscalefpd`` (0 on underflow)."""
    p = v.estrin([v.const(c) for c in EXP16], r)
    return v.scalef(v.mul(v.lookup16(_POW2_16, v.bits(kf)), p), v.mul(kd, v.const(1.0 / 16)))


# 2^(j/16) with j << 48 taken off its bits: adding k << 48 (k = 16 m + j, as a 64-bit
# integer) to entry j puts back j's bits and adds m to the exponent field, so the entry
# becomes 2^(k/16) with two integer operations instead of a multiply and a vscalefpd
def _pow2_16_less_j(flt: str, itg: str, shift: int) -> tuple[float, ...]:
    """``2^(j/16)`` as ``flt`` ("<d" / "<f"), ``j << shift`` taken off its bits (``itg``)."""
    def less(j, t):
        bits = struct.unpack(itg, struct.pack(flt, t))[0] - (j << shift)
        return struct.unpack(flt, struct.pack(itg, bits))[0]
    return tuple(less(j, t) for j, t in enumerate(_POW2_16))


_POW2_16_LESS_J = _pow2_16_less_j("<d", "<q", 48)


def exp_softmax(v: _Vec, w):
    """``e^w`` for softmax (``w = x - shift``, ``w <= 709``; about 1 ulp). The table exp
    of GELU (``_exp_reduce``, ``_exp_finish``) with fewer operations for the multiply-add
    units (10 per vector against 14): ``2^(k/16)`` built from the table's bits by an
    integer shift and add (``_POW2_16_LESS_J``) instead of a multiply and ``vscalefpd``, and
    ``e^w = S + (S r) q(r)`` with ``q`` of degree 5 by Horner's rule (the 4 vectors in
    lockstep hide its latency). As in ``kernels._fastmath.exp_softmax_f64``, ``w`` is
    clamped at -708.3965, so anything below the smallest normal comes out as about
    2.2e-308 instead of 0 (a softmax sum and its scaled row absorb that). NaN stays NaN;
    ``w`` past 709 gives junk, which softmax's callers never keep (they redo such a row
    against its max)."""
    kf, _, r = _exp_reduce(v, v.max_x86(v.const(-708.3965), w))  # vmaxpd keeps a NaN w
    kb = v.bits(kf)
    tab = v.bits(v.lookup16(_POW2_16_LESS_J, kb))
    big = v._map(lambda t, k: v.b.bitcast(v.b.add(t, v.b.shl(k, ir.Constant(
        _I8V, [48] * 8))), _V8), tab, kb)
    q = v.const(EXP16[6])
    for c in EXP16[5:0:-1]:
        q = v.fma(q, r, v.const(c))
    return v.fma(v.mul(big, r), q, big)


def normal_tail_and_exp(v: _Vec, z):
    """``(cdf, e)``: ``Phi(z)`` and ``exp(-z^2 / 2)`` per lane (see the module text)."""
    a = v.minnum(v.fabs(z), v.const(_A_CLAMP))
    # exp(-a^2 / 2) = 2^(k / 16) e^r, a^2 = hi + lo exactly, lo folded into r
    hi = v.mul(a, a)
    lo = v.fma(a, a, v.neg(hi))
    kf, kd, r = _exp_reduce(v, v.mul(hi, v.const(-0.5)))
    e = _exp_finish(v, kf, kd, v.fma(lo, v.const(-0.5), r))
    # Phi(-a) = e F(s) / (a + c): s = (y + 1) S with y = (a - c) / (a + c) = 1 - 2c / (a + c)
    q = v.div(v.const(1.0), v.add(a, v.const(_C)))
    s = v.fma(q, v.const(-2.0 * _C * _S_SCALE), v.const(2.0 * _S_SCALE))
    j = v.trunc_int(s)  # s >= -ulp: truncation gives piece 0 there, never -1
    u = v.sub(s, v.int_to_float(j))
    f = v.estrin([v.lookup16(row, j) for row in ERFCX16], u)
    h = v.mul(v.mul(e, q), f)
    return v.select_neg(z, h, v.sub(v.const(1.0), h)), e


def central_pieces(v: _Vec, a, table=None):
    """``Phi(-a)`` (``table`` ``GELU_GRAD16``: ``R(a)``) for ``0 <= a < _A_CENTRAL``
    (junk elsewhere), without exp or division: piece ``j = round(a / h - 1/2)``, a
    degree-12 polynomial in ``t = a - (j + 1/2) h``, its 13 coefficients looked up per
    lane. ``t`` is exact (``(j + 1/2) h`` is a short binary fraction, within a factor 2
    of ``a``) except for ``a < h / 4``, where its error is below 1e-17."""
    table = NORMAL_TAIL16 if table is None else table
    kf = v.add(v.fma(a, v.const(1.0 / _H), v.const(-0.5)), v.const(_MAGIC))
    kd = v.sub(kf, v.const(_MAGIC))
    t = v.sub(a, v.fma(kd, v.const(_H), v.const(_H / 2)))
    idx = v.bits(kf)
    # Horner in t^2 on the even and the odd coefficients, joined at the end: each
    # coefficient is looked up just before its multiply-add, which keeps 4 vectors in
    # lockstep within the registers (Estrin's scheme looks all 13 up first and spilled:
    # one core in cache, 0.63 against 0.56 ns per element)
    t2 = v.mul(t, t)
    halves = []
    for rows in (table[0::2], table[1::2]):
        acc = v.lookup16(rows[-1], idx)
        for row in rows[-2::-1]:
            acc = v.fma(acc, t2, v.lookup16(row, idx))
        halves.append(acc)
    return v.fma(halves[1], t, halves[0])


def _aligned_frame(builder):
    """Give the function this intrinsic is lowered into (a kernel's parfor body) a 64-byte
    aligned stack frame, so a 512-bit register it spills lands in a 64-byte aligned slot.
    Without a realigned frame LLVM gives such slots the ABI's 16-byte alignment, and a slot
    whose 32-byte half straddles a 4 KiB page boundary made a streaming loop up to 3.6x
    slower at the stack positions where that happens (docs/kernels.md, "Spill slots
    across a page boundary"). Costs one ``and`` in the prologue and the frame pointer's
    register."""
    attrs = builder.function.attributes
    attrs.alignstack = 64
    attrs.add("nounwind")  # numba's code never unwinds; llvmlite prints alignstack only
    # when the set holds another attribute


def _ptr(context, builder, aryty, ary, idx, idxty):
    data = context.make_array(aryty)(context, builder, ary).data
    p = builder.gep(data, [context.cast(builder, idx, idxty, types.intp)])
    return builder.bitcast(p, _V8.as_pointer())


def _store(builder, val, ptr, mask, nt=False):
    """Store a vector (with a mask: only its lanes); ``nt``: a non-temporal store, which
    skips the write-allocate read of the line (``ptr`` must be 64-byte aligned)."""
    align = elem_bytes(val.type)
    if mask is None:
        if nt:
            store_nt(builder, val, ptr)
        else:
            builder.store(val, ptr, align=align)
        return
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [val.type, ptr.type, _I32, mask.type]),
        f"llvm.masked.store.{_vec_name(val.type)}.p0")
    builder.call(fn, [val, ptr, ir.Constant(_I32, align), mask])


class _Block:
    """The ``_UNROLL`` vectors of one call from flat index ``base`` of an array argument:
    their pointers, and the lane masks of a masked call (``n`` elements valid)."""

    def __init__(self, context, builder, sig, args, n64, masked: bool):
        self.context, self.builder, self.sig, self.args = context, builder, sig, args
        self.offs = [ir.Constant(_I64, 8 * q) for q in range(_UNROLL)]
        self.masks = ([_mask(builder, builder.sub(n64, o)) for o in self.offs] if masked
                      else [None] * _UNROLL)

    def ptrs(self, k, base):
        return [_ptr(self.context, self.builder, self.sig.args[k], self.args[k],
                     self.builder.add(base, o), types.int64) for o in self.offs]

    def load(self, k, base):
        return [_load(self.builder, p, m) for p, m in zip(self.ptrs(k, base), self.masks)]

    def reload(self, k, base, vals):
        """``vals`` (this block's ``load(k, base)``) read again, by loads that LLVM may not
        merge with the first, so that it need not keep them in registers or on the stack
        in between (masked calls keep ``vals``): see ``_gelu_central_intrinsic``."""
        if self.masks[0] is not None:
            return vals
        b = self.builder
        ptrs = self.ptrs(k, base)
        # the first pointer through an empty asm: LLVM no longer knows it is the same one
        p0 = b.asm(ir.FunctionType(ptrs[0].type, [ptrs[0].type]), "", "=r,0", [ptrs[0]],
                   side_effect=True)
        return [_load(b, b.gep(p0, [ir.Constant(_I64, q)]), None) for q in range(_UNROLL)]

    def store(self, vals, k, base, nt=False):
        for val, p, m in zip(vals, self.ptrs(k, base), self.masks):
            _store(self.builder, val, p, m, nt)


def _is_f64(a) -> bool:
    return (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
            and a.dtype == types.float64)


BLOCK = 32  # elements per call: 4 vectors in lockstep (see above)
_UNROLL = BLOCK // 8


def _gelu_wide_intrinsic(backward: bool, masked: bool):
    """Build one ``gelu_wide[_bwd]_f64[_tail]`` intrinsic, the full-range path
    (``normal_tail_and_exp``), for the lanes the central pieces put aside: ``(dy, x,
    out, i, n)``, all arrays 1-D C float64 (the forward does not read ``dy``).

    ``z = x[i:i+n]``. Forward: ``out[i:i+n] = z Phi(z)``. Backward: ``out[i:i+n] =
    dy[i:i+n] (Phi(z) + z phi(z))``. ``n`` is ``BLOCK`` for the plain variants; the
    ``_tail`` ones take any ``n`` up to ``BLOCK`` (masked loads and stores, same
    arithmetic)."""

    def typer(typingctx, dy, x, out, i, n):
        if not (all(_is_f64(a) for a in (dy, x, out))
                and all(isinstance(a, types.Integer) for a in (i, n))):
            return None

        def codegen(context, builder, sig, args):
            _aligned_frame(builder)
            v = _Vec(builder, _UNROLL)
            i64 = context.cast(builder, args[3], sig.args[3], types.int64)
            n64 = context.cast(builder, args[4], sig.args[4], types.int64)
            blk = _Block(context, builder, sig, args, n64, masked)
            z = blk.load(1, i64)
            cdf, e = normal_tail_and_exp(v, z)
            if backward:
                res = v.mul(blk.load(0, i64), v.fma(v.mul(z, e), v.const(_INV_SQRT_2PI), cdf))
            else:
                res = v.mul(z, cdf)
            blk.store(res, 2, i64)
            return context.get_dummy_value()

        return types.void(dy, x, out, i, n), codegen

    typer.__name__ = typer.__qualname__ = ("gelu_wide" + ("_bwd" if backward else "") + "_f64"
                                           + ("_tail" if masked else ""))
    return intrinsic(typer)


def _gelu_central_intrinsic(bias: bool, backward: bool, masked: bool, nt: bool = False,
                            staged: bool = False):
    """Build one ``gelu[_bias][_bwd]_f64[_tail|_nt|_staged]`` intrinsic: ``(dy, x, b, out,
    acc, i, j, n, pz, pdy, pi, pj, cnt) -> cnt``; arrays 1-D C, ``pi``/``pj`` int64, the others
    float64 (ones a variant does not use may be any of them), through
    ``central_pieces``. ``z = x[i:i+n]`` (plus ``b[j:j+n]`` with a bias). Forward:
    ``out[i:i+n] = z Phi(z)``. Backward: ``out[i:i+n] = dy (1 + R(|z|))`` where ``z >=
    0``, ``-dy R(|z|)`` below, and with a bias also ``acc[j:j+n] += out[i:i+n]``. ``n``
    is ``BLOCK`` for the plain variants; the ``_tail`` ones take any ``n`` up to
    ``BLOCK`` (masked loads and stores, same arithmetic). The ``_nt`` ones write ``out``
    with non-temporal stores: ``&out[i]`` must be 64-byte aligned and the thread must
    ``sfence()`` before the results are read elsewhere.

    Lanes with ``|z| >= _A_CENTRAL`` (or NaN) get junk in ``out`` (and add nothing to
    ``acc``) and are put aside instead, appended from ``cnt`` on: ``z`` to ``pz``,
    ``dy`` to ``pdy`` (backward), the index in ``out`` to ``pi`` and (bias backward)
    the one in ``acc`` to ``pj`` (int64; each buffer needs ``BLOCK + 8`` free slots).
    The new count is returned. The caller finishes them with the ``gelu_wide_*``
    intrinsics (``kernels.activations._finish``), so each lane's arithmetic depends only
    on its own value.

    ``_nt``: a block with lanes put aside is written with plain stores, through the
    cache, where its finished lanes land soon after (a store into a line just written
    non-temporally waits for it to reach memory and reads it back: finishing lanes in
    place made wide inputs 2x slower from memory). The streamed kernels use ``_staged``
    instead (below): ``kernels.activations._kernel`` sends every streamed float64 call to
    them, so the ``_nt`` ones are compiled into the plain kernels but not run.

    ``_staged`` (not masked; two more arguments ``st, o``): a block with lanes
    put aside is written to the stage ``st[o:o+BLOCK]`` instead, and the places put aside
    are its indices there (``o + k``); a block without is streamed out as in ``_nt``. The
    caller finishes the lanes into the stage and streams the staged blocks out
    (``kernels.activations._finish_staged``)."""

    def check(dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt, st=None, o=None):
        return (all(_is_f64(a) for a in (dy, x, b, out, acc, pz, pdy))
                and all(isinstance(p, types.Array) and p.ndim == 1 and p.layout == "C"
                        and p.dtype == types.int64 for p in (pi, pj))
                and all(isinstance(a, types.Integer) for a in (i, j, n, cnt))
                and (not staged or (_is_f64(st) and isinstance(o, types.Integer))))

    def typer(typingctx, dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt):
        if not check(dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt):
            return None
        return types.int64(dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt), codegen

    def typer_staged(typingctx, dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt, st, o):
        if not check(dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt, st, o):
            return None
        return types.int64(dy, x, b, out, acc, i, j, n, pz, pdy, pi, pj, cnt, st, o), codegen

    def codegen(context, builder, sig, args):
        _aligned_frame(builder)
        v = _Vec(builder, _UNROLL)
        ity, jty, nty = sig.args[5:8]
        i64 = context.cast(builder, args[5], ity, types.int64)
        j64 = context.cast(builder, args[6], jty, types.int64)
        n64 = context.cast(builder, args[7], nty, types.int64)
        cnt = context.cast(builder, args[12], sig.args[12], types.int64)
        # where the block's results go when lanes are put aside: out at i, or with
        # staged the stage (argument 13) at o, and the places put aside are its
        o64 = (context.cast(builder, args[14], sig.args[14], types.int64) if staged
               else i64)
        blk = _Block(context, builder, sig, args, n64, masked)
        xs = blk.load(1, i64)
        bs = blk.load(2, j64) if bias else None
        z = v.add(xs, bs) if bias else xs
        pieces = central_pieces(v, v.fabs(z), GELU_GRAD16 if backward else None)
        # z again, read from memory after the pieces: kept in registers across them,
        # LLVM spilled it to the stack (64-byte slots, 16-byte aligned), and where a
        # 32-byte half of a slot straddled a 4 KiB page boundary the _nt variants ran
        # 3.6x slower (10 of 256 stack positions per page; the stack position depends
        # on the callers, so it came and went by process: docs/kernels.md)
        z = blk.reload(1, i64, xs)
        if bias:
            z = v.add(z, blk.reload(2, j64, bs))
        a = v.fabs(z)
        outs = v._map(lambda x: builder.fcmp_unordered(">=", x, v.const(_A_CENTRAL)), a)
        if backward:
            dyv = blk.load(0, i64)
            res = v.mul(dyv, v.select_neg(z, v.neg(pieces), v.add(v.const(1.0), pieces)))
        else:
            # z Phi(z) = max(z, 0) - a Phi(-a): one multiply-add, no select
            res = v.fma(v.neg(a), pieces, v.max_x86(v.const(0.0), z))
        if not nt:
            blk.store(res, 3, i64)
        if bias and backward:
            kept = v._map(builder.select, outs, v.const(0.0), res)
            blk.store(v.add(blk.load(4, j64), kept), 4, j64)

        i8 = ir.IntType(8)
        bits = [builder.bitcast(o, i8) for o in outs]
        anyb = bits[0]
        for bq in bits[1:]:
            anyb = builder.or_(anyb, bq)
        with builder.if_else(builder.icmp_unsigned("!=", anyb, ir.Constant(i8, 0)),
                             likely=False) as (aside, plain):
            with aside:
                if staged:  # into the stage, streamed out once finished
                    blk.store(res, 13, o64)
                elif nt:  # plain stores (see above)
                    blk.store(res, 3, i64)
                popc = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(i8, [i8]), "llvm.ctpop.i8")
                pos = cnt
                lanes = ir.Constant(_I8V, list(range(8)))
                for q in range(_UNROLL):
                    off = ir.Constant(_I64, 8 * q)
                    put = [(z[q], 8), (builder.add(_splat(builder, builder.add(o64, off),
                                                          _I8V), lanes), 10)]
                    if backward:
                        put.append((dyv[q], 9))
                    if backward and bias:
                        put.append((builder.add(_splat(builder, builder.add(j64, off),
                                                       _I8V), lanes), 11))
                    for val, k in put:
                        _compress_to(builder, val, outs[q], _elem_ptr(
                            context, builder, sig.args[k], args[k], pos, types.int64))
                    pos = builder.add(pos, builder.zext(builder.call(popc, [bits[q]]), _I64))
                after = builder.block
            with plain:
                if nt:
                    blk.store(res, 3, i64, nt)
                before = builder.block
        res = builder.phi(_I64)
        res.add_incoming(cnt, before)
        res.add_incoming(pos, after)
        return res

    if staged:
        typer = typer_staged
    typer.__name__ = typer.__qualname__ = (_variant_name(bias, backward, "f64", masked, nt)
                                           + ("_staged" if staged else ""))
    return intrinsic(typer)


gelu_f64 = _gelu_central_intrinsic(False, False, False)
gelu_f64_tail = _gelu_central_intrinsic(False, False, True)
gelu_f64_nt = _gelu_central_intrinsic(False, False, False, nt=True)
gelu_bias_f64 = _gelu_central_intrinsic(True, False, False)
gelu_bias_f64_tail = _gelu_central_intrinsic(True, False, True)
gelu_bias_f64_nt = _gelu_central_intrinsic(True, False, False, nt=True)
gelu_bwd_f64 = _gelu_central_intrinsic(False, True, False)
gelu_bwd_f64_nt = _gelu_central_intrinsic(False, True, False, nt=True)
gelu_bwd_f64_tail = _gelu_central_intrinsic(False, True, True)
gelu_bias_bwd_f64 = _gelu_central_intrinsic(True, True, False)
gelu_bias_bwd_f64_nt = _gelu_central_intrinsic(True, True, False, nt=True)
gelu_bias_bwd_f64_tail = _gelu_central_intrinsic(True, True, True)
# streamed, the blocks with lanes put aside go to a stage (kernels.activations._finish_staged)
gelu_f64_staged = _gelu_central_intrinsic(False, False, False, nt=True, staged=True)
gelu_bias_f64_staged = _gelu_central_intrinsic(True, False, False, nt=True, staged=True)
gelu_bwd_f64_staged = _gelu_central_intrinsic(False, True, False, nt=True, staged=True)
gelu_bias_bwd_f64_staged = _gelu_central_intrinsic(True, True, False, nt=True, staged=True)
# the lanes the ones above put aside, through normal_tail_and_exp
gelu_wide_f64 = _gelu_wide_intrinsic(False, False)
gelu_wide_f64_tail = _gelu_wide_intrinsic(False, True)
gelu_wide_bwd_f64 = _gelu_wide_intrinsic(True, False)
gelu_wide_bwd_f64_tail = _gelu_wide_intrinsic(True, True)


# -- float32 GELU: 16 lanes per vector (8 with AVX2), the central pieces only --------------
# Phi(-a) (and for the backward R(a) = a phi(a) - Phi(-a)) on 16 pieces of width 0.375
# covering a < 6, degree 6 each (``_erf_fit.fit_normal_tail_pieces(h=0.375, degree=6)``,
# rounded to float32); past _A32 the piece is 0 (Phi(-6) = 1e-9, R(6) = 3.5e-8), so no
# lane is put aside. Evaluated in float32: GELU within 1.6 ulp of the exact value for
# x >= 0 and 1e-5 relative below (where the output is under 1e-5 in size once a > 4).
_H32 = 0.375
_A32 = 5.99  # below 16 _H32 with a margin: 1 / _H32 is inexact, the piece must be <= 15
_MAGIC32 = 1.5 * 2.0 ** 23
NORMAL_TAIL16_F32 = (
    (0.42563432455062866, 0.2868877053260803, 0.17425070703029633, 0.09467574208974838,
     0.04575362429022789, 0.01958007924258709, 0.007394607178866863, 0.0024579011369496584,
     0.0007175423088483512, 0.00018366995209362358, 4.1167466406477615e-05,
     8.070944204519037e-06, 1.3828134797222447e-06, 2.0689702751042205e-07,
     2.7016673342927788e-08, 3.077333721179798e-09),
    (-0.39199090003967285, -0.34056758880615234, -0.25707390904426575, -0.16859318315982819,
     -0.09606150537729263, -0.0475538894534111, -0.020452672615647316, -0.007642604876309633,
     -0.0024811907205730677, -0.0006998521275818348, -0.00017150623898487538,
     -3.6515830288408324e-05, -6.754763944627484e-06, -1.0855932259801193e-06,
     -1.515836487442357e-07, -1.8389341605029585e-08),
    (0.03674914315342903, 0.09578463435173035, 0.12050339579582214, 0.11063928157091141,
     0.08105189353227615, 0.04903995245695114, 0.024926695972681046, 0.010747414082288742,
     0.003954397514462471, 0.0012466113548725843, 0.0003376526874490082, 7.873714639572427e-05,
     1.5831436030566692e-05, 2.7478949959913734e-06, 4.121148720059864e-07,
     5.344337239421293e-08),
    (0.06303387135267258, 0.03880148380994797, 0.005189087707549334, -0.020304987207055092,
     -0.029581137001514435, -0.025789499282836914, -0.016844455152750015,
     -0.008802101947367191, -0.0037880470044910908, -0.0013636817457154393,
     -0.00041455525206401944, -0.00010708240733947605, -2.3604468879057094e-05,
     -4.454219379113056e-06, -7.212275932033663e-07, -1.003886538342158e-07),
    (-0.009079339914023876, -0.02142004854977131, -0.021299656480550766, -0.011777188628911972,
     -0.0010292682563886046, 0.005124146584421396, 0.006109985057264566, 0.004397700075060129,
     0.0023595564998686314, 0.0010067954426631331, 0.000351826281985268,
     0.00010233673674520105, 2.5027082301676273e-05, 5.180614607525058e-06,
     9.120281561081356e-07, 1.370290760860371e-07),
    (-0.00905073992908001, -0.0034011327661573887, 0.0031729075126349926,
     0.0060899327509105206, 0.004767354112118483, 0.0017649894580245018,
     -0.0004352146352175623, -0.0011437948560342193, -0.0009342232369817793,
     -0.0005143375601619482, -0.00021655905584339052, -7.312816887861118e-05,
     -2.0283647245378233e-05, -4.6864888645359315e-06, -9.101830755753326e-07,
     -1.49525789083782e-07),
    (0.0014825278194621205, 0.0031512423884123564, 0.002325717592611909,
     0.00023487342696171254, -0.0011952647473663092, -0.0012797870440408587,
     -0.000632126466371119, -4.919485218124464e-05, 0.0001804734638426453,
     0.00016973831225186586, 9.43388367886655e-05, 3.853097223327495e-05,
     1.2376223821775056e-05, 3.2260606985801132e-06, 6.945986115169944e-07,
     1.249139529591048e-07),
)
GELU_GRAD16_F32 = (
    (-0.3521360158920288, -0.09531842917203903, 0.06675607711076736, 0.12660281360149384,
     0.11635015904903412, 0.07849982380867004, 0.04245878383517265, 0.019036928191781044,
     0.007191253360360861, 0.0023095528595149517, 0.0006341378320939839,
     0.00014940326218493283, 3.02800126519287e-05, 5.288876309350599e-06,
     7.972083153617859e-07, 1.0380834680745465e-07),
    (0.7702008485794067, 0.5733774900436401, 0.28820398449897766, 0.04675829038023949,
     -0.08142713457345963, -0.10718202590942383, -0.08061230182647705, -0.04516899585723877,
     -0.020246902480721474, -0.0074824001640081406, -0.0023160018026828766,
     -0.000606076093390584, -0.00013491018034983426, -2.5651264877524227e-05,
     -4.178588824288454e-06, -5.845026862516534e-07),
    (-0.14570461213588715, -0.3528316617012024, -0.37610238790512085, -0.25196367502212524,
     -0.09339965879917145, 0.012451548129320145, 0.048392850905656815, 0.042024075984954834,
     0.02435970865190029, 0.010834804736077785, 0.003884323639795184, 0.0011493769707158208,
     0.00028453257982619107, 5.943383803241886e-05, 1.0536262379901018e-05,
     1.5918118378976942e-06),
    (-0.245321586728096, -0.10701064765453339, 0.0591139942407608, 0.14304719865322113,
     0.12527167797088623, 0.0608849860727787, 0.007806551642715931, -0.014265390112996101,
     -0.01493227481842041, -0.008892279118299484, -0.0038831287529319525,
     -0.0013370017986744642, -0.00037484089261852205, -8.708855602890253e-05,
     -1.6950643839663826e-05, -2.7840428629133385e-06),
    (0.05394040420651436, 0.11668998748064041, 0.09142576903104782, 0.018611343577504158,
     -0.035221878439188004, -0.04371583089232445, -0.02504224330186844, -0.00576948095113039,
     0.003119640052318573, 0.004100091755390167, 0.0024713953025639057, 0.0010452545247972012,
     0.00034181945375166833, 8.996792166726664e-05, 1.9466604499029927e-05,
     3.5073414892394794e-06),
    (0.05251150205731392, 0.009766475297510624, -0.0320238396525383, -0.03830404207110405,
     -0.016489887610077858, 0.005213295109570026, 0.011825308203697205, 0.007683543488383293,
     0.0021571225952357054, -0.0005372956511564553, -0.0009269631118513644,
     -0.0005575722898356616, -0.00022635127243120223, -6.99297888786532e-05,
     -1.7230269804713316e-05, -3.4685667742451187e-06),
    (-0.011712035164237022, -0.02260611765086651, -0.011740071699023247, 0.005396836902946234,
     0.011636166833341122, 0.006538319867104292, -0.00020595378009602427,
     -0.002714106347411871, -0.0019059282494708896, -0.0005608298815786839,
     9.009899076772854e-05, 0.00018284482939634472, 0.00010549448052188382,
     4.012625868199393e-05, 1.1495822946017142e-05, 2.6096272449649405e-06),
)
# With AVX2 (8 lanes) the lookups are the cost: a 16-entry lookup is two vpermps and a
# blend, an 8-entry one a vpermps, which on the Zen 2 host takes 2 cycles against 0.5 for
# a multiply-add (and 0.84 cycles for a multiply-add beside a vpshufb, 2.0 beside a
# vpermps: docs/kernels.md, "float32 GELU with AVX2, 4 pieces"). So 4 pieces of width 1.5,
# each coefficient looked up by one in-lane vpshufb (the 4 entries' 16 bytes in each half
# of the register, the lane's piece number as byte offsets): degree 8 for Phi(-a), 10
# for R(a) (``_erf_fit.fit_normal_tail_pieces(h=1.5, pieces=4, degree=8 or 10)``, float32
# values). Checked in float32 arithmetic against the test's bounds: GELU within 0.36 of
# its 3e-7 relative bound for x >= 0 and 0.90 of ``2e-5 |GELU| + 7e-9`` below (the cut
# at 5.99, as before, not the fit); GELU' within 9.2e-8 absolute (bound 1.5e-7). Zen 2,
# one core, 2^16 elements, ns per element, these tables over the 8 pieces of width 0.75
# and degree 9 they replace (one vpermps per coefficient): forward 0.92 / 1.17, backward
# 1.10 / 1.22, bias forward 1.13 / 1.34, bias backward 1.61 / 1.68.
_H4 = 1.5
NORMAL_TAIL4_F32 = (
    (0.22662734985351562, 0.012224473059177399, 8.841716771712527e-05, 7.605468255178494e-08),
    (-0.3011375963687897, -0.03173954039812088, -0.00035260661388747394, -4.1224978986065253e-07),
    (0.11292634159326553, 0.03570707142353058, 0.0006611270364373922, 1.0832721955011948e-06),
    (0.021962139755487442, -0.021493006497621536, -0.0007673718500882387, -1.8418080571791506e-06),
    (-0.0229354128241539, 0.006137690041214228, 0.0006093221600167453, 2.224666332040215e-06),
    (0.0001197189194499515, 0.0004787173238582909, -0.0003436009574215859, -1.965400088010938e-06),
    (0.003026027698069811, -0.0009941854514181614, 0.00013318652054294944, 1.4704235127283027e-06),
    (-0.00027640291955322027, 0.00022305142192635685, -2.639289050421212e-05,
     -1.0914725407928927e-06),
    (-0.0002645375789143145, 3.784381260629743e-05, -1.50692653733131e-06, 4.8272886488121e-07),
)
GELU_GRAD4_F32 = (
    (-0.0007742784218862653, 0.05918974429368973, 0.0012338164960965514, 2.091398300763103e-06),
    (0.4328851103782654, -0.09720268845558167, -0.004253187216818333, -1.0553348147368524e-05),
    (-0.38818496465682983, 0.03793881833553314, 0.006652489770203829, 2.553516605985351e-05),
    (-0.019018743187189102, 0.030727224424481392, -0.006071416661143303, -3.9274327718885615e-05),
    (0.11413917690515518, -0.035881802439689636, 0.0033643203787505627, 4.285410250304267e-05),
    (-0.01454635988920927, 0.010612934827804565, -0.0009293153416365385, -3.4974833397427574e-05),
    (-0.019475076347589493, 0.002789558144286275, -0.00013299108832143247, 2.1890211428399198e-05),
    (0.00444065872579813, -0.002682961756363511, 0.0002452215412631631, -1.05742656160146e-05),
    (0.0022400273010134697, 0.00038383412174880505, -9.9752469395753e-05, 3.7448082821356365e-06),
    (-0.0006198164774104953, 0.00022411617101170123, 6.769957508367952e-06, -6.898429774082615e-07),
    (-0.00016960754874162376, -8.15286985016428e-05, 7.2862490014813375e-06,
     -4.9887347586263786e-08),
)
BLOCK32 = 64  # elements per call: 4 vectors of 16 in lockstep
_I16V = ir.VectorType(_I32, 16)


def _is_f32(a) -> bool:
    return (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
            and a.dtype == types.float32)


def _pieces_f32(builder, z, table):
    """``(a, q)`` for float32 vector ``z``: ``a = |z|``, ``q`` the pieces at ``a`` (0 at
    or past ``_A32``; NaN stays NaN)."""
    def fn(name, ret, nargs):
        return cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ret, nargs), name)

    vty = z.type
    lanes = vty.count
    ity = ir.VectorType(_I32, lanes)

    def c(v):
        return ir.Constant(vty, [_to_f32(v)] * lanes)

    sfx = _vec_name(vty)
    fma = fn(f"llvm.fma.{sfx}", vty, [vty] * 3)
    a = builder.call(fn(f"llvm.fabs.{sfx}", vty, [vty]), [z])
    if lanes == 16:  # AVX-512: 16 pieces, one vpermps (16 entries) per coefficient
        kf = builder.fadd(builder.call(fma, [a, c(1.0 / _H32), c(-0.5)]), c(_MAGIC32))
        kd = builder.fsub(kf, c(_MAGIC32))
        t = builder.fsub(a, builder.call(fma, [kd, c(_H32), c(_H32 / 2)]))
        idx = builder.bitcast(kf, ity)
        perm = fn("llvm.x86.avx512.permvar.sf.512", vty, [vty, ity])

        def look(row):
            return builder.call(perm, [ir.Constant(vty, [_to_f32(v) for v in row]), idx])
    else:  # AVX2: 4 pieces, one vpshufb per coefficient (see the tables)
        # the piece by a rounding instruction rather than the magic-number addition, and
        # t = (a - h/2) - k h by one multiply-add: a shorter chain before the polynomial
        # (1.04x). a - h/2 is exact for a >= h/4 (as t was before); the truncating
        # conversion is defined for NaN and inf (their lanes' results are NaN or cut off)
        kd = builder.call(fn(f"llvm.roundeven.{sfx}", vty, [vty]),
                          [builder.call(fma, [a, c(1.0 / _H4), c(-0.5)])])
        t = builder.call(fma, [kd, c(-_H4), builder.fsub(a, c(_H4 / 2))])
        idx = builder.call(fn("llvm.x86.avx.cvtt.ps2dq.256", ity, [vty]), [kd])
        bty = ir.VectorType(ir.IntType(8), 4 * lanes)
        pshufb = fn("llvm.x86.avx2.pshuf.b", bty, [bty, bty])
        # byte offsets: 4 k + 0..3 in each lane's 4 bytes (k's low byte spread, then added)
        four = builder.bitcast(builder.shl(idx, ir.Constant(ity, [2] * lanes)), bty)
        spread = builder.call(pshufb, [four, ir.Constant(bty, [p % 16 // 4 * 4
                                                                for p in range(4 * lanes)])])
        ctrl = builder.add(spread, ir.Constant(bty, [p % 4 for p in range(4 * lanes)]))

        def look(row):
            both = struct.pack("<4f", *row) * (lanes // 4)  # the 4 entries in each half
            return builder.bitcast(builder.call(pshufb, [ir.Constant(bty, list(both)),
                                                         ctrl]), vty)

    t2 = builder.fmul(t, t)
    halves = []
    for rows in (table[0::2], table[1::2]):
        acc = look(rows[-1])
        for row in rows[-2::-1]:
            acc = builder.call(fma, [acc, t2, look(row)])
        halves.append(acc)
    q = builder.call(fma, [halves[1], t, halves[0]])
    past = builder.fcmp_ordered(">=", a, c(_A32))
    return a, builder.select(past, c(0.0), q)


def _gelu32_intrinsic(bias: bool, backward: bool, masked: bool, nt: bool = False):
    """Build one ``gelu[_bias][_bwd]_f32[_tail|_nt]`` intrinsic: ``(dy, x, b, out, acc,
    i, j, n)``, arrays 1-D C float32 (ones a variant does not use may be any of them).
    ``z = x[i:i+n]`` (plus ``b[j:j+n]`` with a bias). Forward: ``out[i:i+n] = z
    Phi(z)``; backward: ``dy GELU'(z)``, and with a bias also ``acc[j:j+n] += out``.
    ``n`` is ``BLOCK32`` for the plain variants, up to it for ``_tail`` (masked loads and
    stores, same arithmetic); ``_nt`` writes ``out`` with non-temporal stores (``&out[i]``
    64-byte aligned; ``sfence()`` before the results are read elsewhere)."""

    def typer(typingctx, dy, x, b, out, acc, i, j, n):
        if not (all(_is_f32(a) for a in (dy, x, b, out, acc))
                and all(isinstance(a, types.Integer) for a in (i, j, n))):
            return None

        def codegen(context, builder, sig, args):
            _aligned_frame(builder)
            lanes = row_lanes(True)
            vty = _row_vty(True)
            i64, j64, n64 = (context.cast(builder, args[k], sig.args[k], types.int64)
                             for k in (5, 6, 7))
            offs = [ir.Constant(_I64, lanes * q) for q in range(BLOCK32 // lanes)]
            masks = ([_mask(builder, builder.sub(n64, o), lanes) for o in offs] if masked
                     else [None] * len(offs))

            def ptr(k, base, q):
                return builder.bitcast(_elem_ptr(context, builder, sig.args[k], args[k],
                                                 builder.add(base, offs[q]), types.int64),
                                       vty.as_pointer())

            def ptrs(k, base):
                return [ptr(k, base, q) for q in range(len(offs))]

            def load(k, base):
                return [_load(builder, p, m) for p, m in zip(ptrs(k, base), masks)]

            # AVX2: 4 pieces, one vpshufb per coefficient
            table = ((GELU_GRAD16_F32 if backward else NORMAL_TAIL16_F32) if lanes == 16 else
                     (GELU_GRAD4_F32 if backward else NORMAL_TAIL4_F32))
            one = ir.Constant(vty, [1.0] * lanes)
            zero = ir.Constant(vty, [0.0] * lanes)

            def gelu_of(z, dy):
                _, p = _pieces_f32(builder, z, table)
                neg = builder.fcmp_ordered("<", z, zero)
                if backward:  # GELU' = 1 + R(a) for z >= 0, -R(a) below
                    g = builder.select(neg, builder.fneg(p), builder.fadd(one, p))
                    return builder.fmul(dy, g)
                # z Phi(z): Phi(z) = 1 - Phi(-a) for z >= 0
                return builder.fmul(z, builder.select(neg, p, builder.fsub(one, p)))

            if lanes != 16:  # AVX2: one vector from its load to its store at a time (the
                # whole block's 8 vectors at once spilled on its 16 registers)
                for q, m in enumerate(masks):
                    z = _load(builder, ptr(1, i64, q), m)
                    if bias:
                        z = builder.fadd(z, _load(builder, ptr(2, j64, q), m))
                    val = gelu_of(z, _load(builder, ptr(0, i64, q), m) if backward else None)
                    _store(builder, val, ptr(3, i64, q), m, nt and m is None)
                    if bias and backward:
                        p4 = ptr(4, j64, q)
                        _store(builder, builder.fadd(_load(builder, p4, m), val), p4, m)
                return context.get_dummy_value()
            zs = load(1, i64)
            if bias:
                zs = [builder.fadd(z, bv) for z, bv in zip(zs, load(2, j64))]
            dys = load(0, i64) if backward else [None] * len(zs)
            res = [gelu_of(z, dy) for z, dy in zip(zs, dys)]
            for val, p, m in zip(res, ptrs(3, i64), masks):
                _store(builder, val, p, m, nt and m is None)
            if bias and backward:
                accs = load(4, j64)
                for val, a, p, m in zip(res, accs, ptrs(4, j64), masks):
                    _store(builder, builder.fadd(a, val), p, m)
            return context.get_dummy_value()

        return types.void(dy, x, b, out, acc, i, j, n), codegen

    typer.__name__ = typer.__qualname__ = _variant_name(bias, backward, "f32", masked, nt)
    return intrinsic(typer)


gelu_f32 = _gelu32_intrinsic(False, False, False)
gelu_f32_tail = _gelu32_intrinsic(False, False, True)
gelu_f32_nt = _gelu32_intrinsic(False, False, False, nt=True)
gelu_bias_f32 = _gelu32_intrinsic(True, False, False)
gelu_bias_f32_tail = _gelu32_intrinsic(True, False, True)
gelu_bias_f32_nt = _gelu32_intrinsic(True, False, False, nt=True)
gelu_bwd_f32 = _gelu32_intrinsic(False, True, False)
gelu_bwd_f32_tail = _gelu32_intrinsic(False, True, True)
gelu_bwd_f32_nt = _gelu32_intrinsic(False, True, False, nt=True)
gelu_bias_bwd_f32 = _gelu32_intrinsic(True, True, False)
gelu_bias_bwd_f32_tail = _gelu32_intrinsic(True, True, True)
gelu_bias_bwd_f32_nt = _gelu32_intrinsic(True, True, False, nt=True)


# -- float64 GELU without AVX-512: 4 lanes per vector, the pieces read from memory --------
# AVX2 has no variable permute of doubles across a register (AVX-512's vpermi2pd), and
# lookups in the 16-piece table by vpermps pairs cost 3 instructions per coefficient. So
# the tables of ``kernels._pieces_mem`` (128 pieces of width 5/128, degree 7: 8
# coefficients, one 64-byte line per piece, at most 2.7 ulp in exact arithmetic) stay in
# memory, and each lane reads its piece's line as two 32-byte loads, transposed into the
# coefficient vectors in registers (``_mem_lookup``). Lanes with ``|z| >= _A_CENTRAL``
# (or NaN) are reported in a bit mask and finished by the caller (``kernels.activations``).
# One core, N(0, 1) inputs, ns per element: 1.9-2.0 (backward 2.1), against 4.0-4.3 for
# the portable loop (the 8 loads and 16 shuffles per vector cost 1.2 of it: with the
# coefficients as constants, 0.73; the Horner-in-t^2 or Estrin's order, and 16-byte
# pair loads with inserts instead of the 32-byte ones, all measured the same).
_HMEM = 5.0 / _pieces_mem.PIECES


def _table_global(module, name: str, rows) -> ir.GlobalVariable:
    """A constant ``[len(rows) x [len(rows[0]) x double]]`` in ``module``, 64-byte
    aligned (one per module, found again by name)."""
    if name in module.globals:
        return module.globals[name]
    aty = ir.ArrayType(ir.ArrayType(_F64, len(rows[0])), len(rows))
    g = ir.GlobalVariable(module, aty, name)
    g.initializer = ir.Constant(aty, [ir.Constant(aty.element, [float(c) for c in r])
                                      for r in rows])
    g.global_constant = True
    g.linkage = "internal"
    g.align = 64
    return g


def _mem_lookup(builder, table, idx):
    """The coefficient vectors ``table[idx[k]][m]`` (lane ``k``) for every ``m``: ``idx``
    a <4 x i32> of piece numbers within the table, which has a multiple of 4 coefficients
    per piece: 4 at a time, one 32-byte load per lane and a 4 x 4 transpose."""
    ncoef = table.type.pointee.element.count
    v4 = ir.VectorType(_F64, 4)
    rows = [builder.extract_element(idx, ir.Constant(_I32, k)) for k in range(4)]
    zero = ir.Constant(_I32, 0)
    out = []
    i4 = ir.VectorType(_I32, 4)
    for m in range(0, ncoef, 4):
        r = []
        for row in rows:
            p = builder.gep(table, [zero, row, ir.Constant(_I32, m)], inbounds=True)
            r.append(builder.load(builder.bitcast(p, v4.as_pointer()), align=32))
        # 4x4 transpose: unpack within 128-bit halves, then swap halves
        a0 = builder.shuffle_vector(r[0], r[1], ir.Constant(i4, [0, 4, 2, 6]))
        a1 = builder.shuffle_vector(r[0], r[1], ir.Constant(i4, [1, 5, 3, 7]))
        a2 = builder.shuffle_vector(r[2], r[3], ir.Constant(i4, [0, 4, 2, 6]))
        a3 = builder.shuffle_vector(r[2], r[3], ir.Constant(i4, [1, 5, 3, 7]))
        out.append(builder.shuffle_vector(a0, a2, ir.Constant(i4, [0, 1, 4, 5])))
        out.append(builder.shuffle_vector(a1, a3, ir.Constant(i4, [0, 1, 4, 5])))
        out.append(builder.shuffle_vector(a0, a2, ir.Constant(i4, [2, 3, 6, 7])))
        out.append(builder.shuffle_vector(a1, a3, ir.Constant(i4, [2, 3, 6, 7])))
    return out


def _piece_mem(builder, a):
    """``(t, j)`` for a <4 x double> ``a >= 0``: the piece ``j`` of ``central_pieces_mem``
    (a <4 x i32>, at most the last: ``vminpd`` gives the last for NaN too) and ``t = a -
    (j + 1/2) h``."""
    vty = a.type

    def c(v):
        return ir.Constant(vty, [float(v)] * 4)

    def fn(name, n):
        return cgutils.get_or_insert_function(builder.module,
                                              ir.FunctionType(vty, [vty] * n), name)

    kd = builder.call(fn("llvm.x86.avx.min.pd.256", 2), [
        builder.call(fn("llvm.floor.v4f64", 1), [builder.fmul(a, c(1.0 / _HMEM))]),
        c(_pieces_mem.PIECES - 1.0)])
    t = builder.fsub(builder.call(fn("llvm.fma.v4f64", 3), [kd, c(-_HMEM), a]), c(_HMEM / 2))
    return t, builder.fptosi(kd, ir.VectorType(_I32, 4))


def central_pieces_mem(builder, t, co):
    """``Phi(-a)`` (``GELU_GRAD``'s coefficients: ``R(a)``) for a <4 x double> ``0 <= a <
    _A_CENTRAL`` (junk elsewhere), given ``(t, j) = _piece_mem(builder, a)`` and ``co =
    _mem_lookup(builder, table, j)``: ``central_pieces`` with 128 pieces from memory
    instead of 16 from registers."""
    fma = cgutils.get_or_insert_function(builder.module,
                                         ir.FunctionType(t.type, [t.type] * 3),
                                         "llvm.fma.v4f64")
    t2 = builder.fmul(t, t)
    even, odd = co[-2], co[-1]
    for m in range(len(co) - 4, -1, -2):  # Horner in t^2 on each half, joined at the end
        even = builder.call(fma, [even, t2, co[m]])
        odd = builder.call(fma, [odd, t2, co[m + 1]])
    return builder.call(fma, [odd, t, even])


def _gelu64_avx2_intrinsic(bias: bool, backward: bool, masked: bool, nt: bool = False):
    """Build one ``gelu[_bias][_bwd]_f64_avx2[_tail|_nt]`` intrinsic: ``(dy, x, b, out,
    acc, i, j, n, pz, pdy, cnt) -> mask``, arrays 1-D C float64 (ones a variant does not
    use may be any of them), ``BLOCK`` elements per call as 8 vectors of 4. ``z =
    x[i:i+n]`` (plus ``b[j:j+n]`` with a bias). Forward: ``out[i:i+n]
    = z Phi(z)``; backward: ``dy (1 + R(|z|))`` where ``z >= 0``, ``-dy R(|z|)`` below,
    and with a bias also ``acc[j:j+n] += out``. ``n`` is ``BLOCK`` for the plain
    variants, up to it for ``_tail`` (masked loads and stores, same arithmetic).

    Bit ``k`` of the returned int64 is set where ``|z[k]| >= _A_CENTRAL`` or NaN: that
    lane of ``out`` holds junk (and adds nothing to ``acc``), for the caller to finish.
    For that, every call also writes all of ``z`` to ``pz[cnt:cnt+BLOCK]`` and ``dy`` to
    ``pdy[cnt:...]`` (backward), where the caller packs the lanes it keeps (``out`` may
    be ``x`` or ``dy``, so they cannot be read back; AVX2 has no compress). Those stores
    (into the L1 cache) cost nothing measurable, one core in cache.
    ``_nt`` writes ``out`` with non-temporal stores (``&out[i]`` 32-byte aligned;
    ``sfence()`` before the results are read elsewhere), unless a lane is reported:
    then the block goes through the cache, where the caller's fix lands soon after."""

    def typer(typingctx, dy, x, b, out, acc, i, j, n, pz, pdy, cnt):
        if not (all(_is_f64(a) for a in (dy, x, b, out, acc, pz, pdy))
                and all(isinstance(a, types.Integer) for a in (i, j, n, cnt))):
            return None

        def codegen(context, builder, sig, args):
            _aligned_frame(builder)
            vty = ir.VectorType(_F64, 4)
            c64 = context.cast(builder, args[10], sig.args[10], types.int64)
            i64, j64, n64 = (context.cast(builder, args[k], sig.args[k], types.int64)
                             for k in (5, 6, 7))
            nvec = BLOCK // 4
            offs = [ir.Constant(_I64, 4 * q) for q in range(nvec)]
            masks = ([_mask(builder, builder.sub(n64, o), 4) for o in offs] if masked
                     else [None] * nvec)
            name = "hpcgw_gelu_grad64" if backward else "hpcgw_normal_tail64"
            table = _table_global(builder.module, name,
                                  _pieces_mem.GELU_GRAD if backward
                                  else _pieces_mem.NORMAL_TAIL)
            fmaf = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3), "llvm.fma.v4f64")
            fabs = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty]), "llvm.fabs.v4f64")
            vmax = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty]), "llvm.x86.avx.max.pd.256")
            one = ir.Constant(vty, [1.0] * 4)
            zero = ir.Constant(vty, [0.0] * 4)
            limit = ir.Constant(vty, [_A_CENTRAL] * 4)
            i4 = ir.IntType(4)

            def ptr(k, base, q):
                return builder.bitcast(_elem_ptr(context, builder, sig.args[k], args[k],
                                                 builder.add(base, offs[q]), types.int64),
                                       vty.as_pointer())

            def z_of(q):
                z = _load(builder, ptr(1, i64, q), masks[q])
                if bias:
                    z = builder.fadd(z, _load(builder, ptr(2, j64, q), masks[q]))
                return z

            # software-pipelined: every vector's piece first, and each vector's
            # coefficients read before the previous vector's polynomial (one core in
            # cache, 1.94 -> 1.75 ns per element; backward 2.2 -> 1.9), so the reads'
            # long chain (convert, extract, load, transpose) starts early
            pre = []
            for q, m in enumerate(masks):
                z = z_of(q)
                a = builder.call(fabs, [z])
                outside = builder.fcmp_unordered(">=", a, limit)
                if m is not None:
                    outside = builder.and_(outside, m)
                pre.append((z, a, outside) + _piece_mem(builder, a))

            def body(stream):
                bits = ir.Constant(_I64, 0)
                nxt = _mem_lookup(builder, table, pre[0][4])
                for q, m in enumerate(masks):
                    z, a, outside, tq, _ = pre[q]
                    co = nxt
                    if q + 1 < nvec:
                        nxt = _mem_lookup(builder, table, pre[q + 1][4])
                    builder.store(z, ptr(8, c64, q), align=8)
                    p = central_pieces_mem(builder, tq, co)
                    if backward:
                        neg = builder.fcmp_ordered("<", z, zero)
                        g = builder.select(neg, builder.fneg(p), builder.fadd(one, p))
                        dyv = _load(builder, ptr(0, i64, q), m)
                        builder.store(dyv, ptr(9, c64, q), align=8)
                        val = builder.fmul(dyv, g)
                    else:  # z Phi(z) = max(z, 0) - a Phi(-a): vmaxpd keeps z = -0.0
                        val = builder.call(fmaf, [builder.fneg(a), p,
                                                  builder.call(vmax, [zero, z])])
                    _store(builder, val, ptr(3, i64, q), m, stream and m is None)
                    if bias and backward:
                        p4 = ptr(4, j64, q)
                        kept = builder.select(outside, zero, val)
                        _store(builder, builder.fadd(_load(builder, p4, m), kept), p4, m)
                    lane_bits = builder.zext(builder.bitcast(outside, i4), _I64)
                    bits = builder.or_(bits, builder.shl(lane_bits, ir.Constant(_I64, 4 * q)))
                return bits

            if not nt:
                return body(False)
            anyv = pre[0][2]
            for q in range(1, nvec):
                anyv = builder.or_(anyv, pre[q][2])
            anyb = builder.icmp_unsigned("!=", builder.bitcast(anyv, i4), ir.Constant(i4, 0))
            with builder.if_else(anyb, likely=False) as (aside, plain):
                with aside:
                    got_aside = body(False)
                    from_aside = builder.block
                with plain:
                    got_plain = body(True)
                    from_plain = builder.block
            res = builder.phi(_I64)
            res.add_incoming(got_aside, from_aside)
            res.add_incoming(got_plain, from_plain)
            return res

        return types.int64(dy, x, b, out, acc, i, j, n, pz, pdy, cnt), codegen

    typer.__name__ = typer.__qualname__ = _variant_name(bias, backward, "f64_avx2", masked, nt)
    return intrinsic(typer)


# (bias, backward) -> the plain, masked tail and non-temporal variant, as
# kernels.activations calls them
GELU_F64_AVX2 = {(bias, backward): tuple(_gelu64_avx2_intrinsic(bias, backward, kind == 1,
                                                                kind == 2) for kind in range(3))
                 for bias in (False, True) for backward in (False, True)}


def _softmax_exp_intrinsic(masked: bool):
    """Build ``softmax_exp_f64[_tail](x, g, i, gi, mx, n)``: ``g[gi:gi+n] = exp(x[i:i+n] -
    mx)`` (``mx`` any shift: ``x - mx`` up to 709) and return ``(their sum, max of
    x[i:i+n])`` (a NaN may or may not win the max); ``n = BLOCK`` for the plain variant,
    up to ``BLOCK`` (masked) for ``_tail``. ``gi`` is ``i`` when ``g`` is the gradient,
    the offset in the row when it is a scratch row. For float64 softmax: the table exp
    (``exp_softmax``) takes about 18 vector operations per 8 lanes with the load, store
    and sum, the portable one about 28."""

    def typer(typingctx, x, g, i, gi, mx, n):
        if not (_is_f64(x) and _is_f64(g) and mx == types.float64
                and all(isinstance(a, types.Integer) for a in (i, gi, n))):
            return None

        def codegen(context, builder, sig, args):
            _aligned_frame(builder)
            _, _, iv, giv, mxv, nv = args
            v = _Vec(builder, _UNROLL)
            n64 = context.cast(builder, nv, sig.args[5], types.int64)
            i64 = context.cast(builder, iv, sig.args[2], types.int64)
            g64 = context.cast(builder, giv, sig.args[3], types.int64)
            blk = _Block(context, builder, sig, args, n64, masked)
            mxb = builder.insert_element(ir.Constant(_V8, ir.Undefined), mxv,
                                         ir.Constant(_I32, 0))
            mxb = builder.shuffle_vector(mxb, ir.Constant(_V8, ir.Undefined),
                                         ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
            xs = blk.load(0, i64)
            e = exp_softmax(v, v.sub(xs, mxb))
            if masked:  # lanes past n: w = 0 - mx there; keep them out of the sum
                e = [builder.select(m, x, ir.Constant(_V8, [0.0] * 8))
                     for x, m in zip(e, blk.masks)]
            blk.store(e, 1, g64)
            total = v.hsum(e)
            if masked:  # and out of the max
                xs = [builder.select(m, x, ir.Constant(_V8, [-math.inf] * 8))
                      for x, m in zip(xs, blk.masks)]
            return context.make_tuple(builder, sig.return_type, [total, v.hmax(xs)])

        return types.UniTuple(types.float64, 2)(x, g, i, gi, mx, n), codegen

    typer.__name__ = typer.__qualname__ = "softmax_exp_f64" + ("_tail" if masked else "")
    return intrinsic(typer)


softmax_exp_f64 = _softmax_exp_intrinsic(False)
softmax_exp_f64_tail = _softmax_exp_intrinsic(True)


# -- softmax + cross-entropy of short rows (a few vectors each), held in registers -------



def _exp_bits(builder, w, f32: bool):
    """``kernels._fastmath.exp_softmax_f32`` (``f32``) or ``exp_nonpos_f64`` on a vector
    of any width: the same operations in the same order (their FMAs where ``contract``
    fuses), so the same results. ``n`` is rounded by adding ``ROUND_F32`` /
    ``ROUND_F64`` (``1.5 * 2^m + bias``), whose sum holds ``n + bias`` in its low
    mantissa bits: ``2^n`` is those bits shifted into the exponent field (no
    float-to-int conversion, which AVX2 lacks for 64-bit integers); on 16 float32 lanes
    (AVX-512) by ``vscalefps`` instead. The clamp is one ``vmaxps(lo, w)`` /
    ``vmaxpd``, which is ``w`` where ``w`` is NaN (maxnum and a select on an unordered
    compare took three instructions, the select on an ordered one two). A NaN ``w``
    stays NaN."""
    vty = w.type
    lanes = vty.count
    ity = ir.VectorType(ir.IntType(32 if f32 else 64), lanes)
    zmm = f32 and lanes == 16

    def c(v):
        return ir.Constant(vty, [_to_f32(v) if f32 else float(v)] * lanes)

    def fn(name, nargs):
        return cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty] * nargs), f"{name}.{_vec_name(vty)}")

    fma = fn("llvm.fma", 3)
    lo = c(EXP_MIN_F32 if f32 else -708.3965)
    if zmm:
        vmax = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, _I32]),
            "llvm.x86.avx512.max.ps.512")
        xc = builder.call(vmax, [lo, w, ir.Constant(_I32, 4)])
    else:  # LLVM makes this vmaxps(lo, w) / vmaxpd on 256-bit vectors
        xc = builder.select(builder.fcmp_ordered("<", w, lo), lo, w)  # NaN stays
    # n rounded by adding ROUND_F32 / ROUND_F64, as exp_softmax_f32 / _f64 do
    rnd = ROUND_F32 if f32 else ROUND_F64
    t = builder.call(fma, [xc, c(_LOG2E), c(rnd)])
    n = builder.fsub(t, c(rnd))
    nn = builder.fneg(n)
    r = builder.call(fma, [nn, c(LN2_HI_F32 if f32 else _LN2_HI), xc])
    r = builder.call(fma, [nn, c(LN2_LO_F32 if f32 else _LN2_LO), r])
    if f32:
        p = c(_EXP5_F32[5])
        for g in _EXP5_F32[4::-1]:
            p = builder.call(fma, [p, r, c(g)])
    else:  # kernels._fastmath._exp_poly_f64 (Estrin)
        r2 = builder.fmul(r, r)
        r4 = builder.fmul(r2, r2)

        def lin(k):
            return builder.call(fma, [c(_EXP[k + 1]), r, c(_EXP[k])])

        a = builder.call(fma, [lin(2), r2, lin(0)])
        b = builder.call(fma, [lin(6), r2, lin(4)])
        cc = builder.call(fma, [lin(10), r2, lin(8)])
        p = builder.call(fma, [builder.call(fma, [cc, r4, b]), r4, a])
    if zmm:
        scalef = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty, ir.IntType(16), _I32]),
            "llvm.x86.avx512.mask.scalef.ps.512")
        return builder.call(scalef, [p, n, p, ir.Constant(ir.IntType(16), -1),
                                     ir.Constant(_I32, 4)])
    mbits = 23 if f32 else 52
    biased = builder.bitcast(t, ity)
    pow2 = builder.bitcast(builder.shl(biased, ir.Constant(ity, [mbits] * lanes)), vty)
    res = builder.fmul(p, pow2)
    if f32:
        return res
    return builder.select(builder.fcmp_ordered("<", w, lo), c(0.0), res)


def _exp_nonpos_f64(builder, ws):
    """``e^w`` for each float64 vector of the list ``ws`` (``w <= 0``): on 8 lanes the
    table exp (``exp_softmax``, the vectors in lockstep), on other widths ``_exp_bits``."""
    if ws[0].type.count != 8:
        return [_exp_bits(builder, w, False) for w in ws]
    es = exp_softmax(_Vec(builder, len(ws)), ws)
    return es if isinstance(es, list) else [es]


# float32 2^(j/16) with j << 19 taken off its bits (as _POW2_16_LESS_J for float64)
_POW2_16_F32_LESS_J = _pow2_16_less_j("<f", "<i", 19)
_MAGIC_F32 = 1.5 * 2.0 ** 23


def _exp_softmax_f32(builder, w):
    """``e^w`` on float32 lanes for the row and block kernels (``w <= 0``). On 8 lanes
    ``kernels._fastmath.exp_softmax_f32`` (``_exp_bits``: the same operations, so the
    same results). On 16 lanes (AVX-512) the table exp of ``exp_softmax`` in float32:
    ``w = k ln2/16 + r``, ``2^(k/16)`` from a 16-entry table in one register (``vpermps``)
    with ``k << 19`` added to its bits (``_POW2_16_F32_LESS_J``), ``e^r = 1 + r q(r)``
    with ``q`` of degree 2 (``|r| <= ln2/32``: the first term left out is below 1e-8),
    ``e^w = S + (S r) q``: 7 operations for the multiply-add units instead of 9. About
    1 ulp; clamped at ``EXP_MIN_F32``, so what is below the smallest normal comes out
    as at most about 1.2e-38; a NaN ``w`` stays NaN."""
    lanes = w.type.count
    if lanes != 16:
        return _exp_bits(builder, w, True)
    vty, ity = w.type, ir.VectorType(_I32, 16)

    def c(v):
        return ir.Constant(vty, [_to_f32(v)] * lanes)

    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         "llvm.fma.v16f32")
    vmax = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [vty, vty, _I32]), "llvm.x86.avx512.max.ps.512")
    perm = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [vty, ity]), "llvm.x86.avx512.permvar.sf.512")
    xc = builder.call(vmax, [c(EXP_MIN_F32), w, ir.Constant(_I32, 4)])  # keeps a NaN w
    kf = builder.call(fma, [xc, c(16.0 / math.log(2)), c(_MAGIC_F32)])
    nk = builder.fsub(c(_MAGIC_F32), kf)  # -k, exact
    r = builder.call(fma, [nk, c(float(LN2_HI_F32) / 16), xc])
    r = builder.call(fma, [nk, c(float(LN2_LO_F32) / 16), r])
    kb = builder.bitcast(kf, ity)
    tab = ir.Constant(vty, [_to_f32(t) for t in _POW2_16_F32_LESS_J])
    big = builder.add(builder.bitcast(builder.call(perm, [tab, kb]), ity),
                      builder.shl(kb, ir.Constant(ity, [19] * lanes)))
    big = builder.bitcast(big, vty)
    q = builder.call(fma, [r, c(1.0 / 6), c(0.5)])
    q = builder.call(fma, [q, r, c(1.0)])
    return builder.call(fma, [builder.fmul(big, r), q, big])


def _streamed_or_not(builder, nt, emit):
    """``emit(True)`` where the i1 ``nt`` is true, else ``emit(False)``: the stores
    emitted non-temporal or plain (the choice must be known when emitting them)."""
    with builder.if_else(nt) as (yes, no):
        for branch, streamed in ((yes, True), (no, False)):
            with branch:
                emit(streamed)


def _full_or_masked(builder, n, need, plain, masked):
    """``plain()`` where ``n >= need`` (a whole vector), else ``masked()``, and the
    value they return if any: masked loads and stores of whole vectors are slow here."""
    full = builder.icmp_signed(">=", n, ir.Constant(_I64, need))
    with builder.if_else(full, likely=True) as (a, b):
        with a:
            va = plain()
            ba = builder.block
        with b:
            vb = masked()
            bb = builder.block
    if va is None:
        return None
    phi = builder.phi(va.type)
    phi.add_incoming(va, ba)
    phi.add_incoming(vb, bb)
    return phi


def _to_f32(v: float) -> float:
    """``v`` rounded to float32 (an LLVM float constant must be exact in float32)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _row_load(builder, ptr, n, room, q, lanes, fill=0.0):
    """Vector ``q`` of a row of ``n`` elements at ``ptr``, lanes past the row ``fill``,
    when ``room`` elements from the row's start may be read: a plain load where the row
    covers the vector, or where ``room`` does (the lanes past the row then set in
    registers), else a masked load; a ``fill`` vector, and no load, when the row ends
    before the vector starts (masked loads of whole or empty vectors measured 2-3x
    slower from memory). ``room=None``: no plain load of a partial vector (this branch
    cost rows of 8 vectors 10-20%: float64 layer norm backward at 64 features, 1.8 ->
    2.1 ms)."""
    rest = ir.Constant(ptr.type.pointee, [fill] * lanes)
    start = ir.Constant(_I64, q * lanes)

    def partial():
        mask = _mask(builder, builder.sub(n, start), lanes)
        if room is None:
            return _load(builder, ptr, mask, rest)
        return _full_or_masked(
            builder, room, (q + 1) * lanes,
            # hidden: a select on a plain load is otherwise folded into a zero-masked
            # load, 2x slower here from memory (layer norm backward of 16 float32
            # features: 0.9 -> 1.9 ms at 2^22 elements)
            lambda: builder.select(mask, hidden(builder, _load(builder, ptr, None)), rest),
            lambda: _load(builder, ptr, mask, rest))

    return _full_or_masked(
        builder, n, (q + 1) * lanes, lambda: _load(builder, ptr, None),
        lambda: _full_or_masked(builder, n, q * lanes + 1, partial, lambda: rest))


def _row_store(builder, val, ptr, n, room, q, lanes, nt=None):
    """Store vector ``q`` of a row of ``n`` elements when ``room`` elements from the
    row's start may be written: plain where they cover the vector (non-temporal where
    the i1 ``nt`` is true), else masked; nothing when the row ends before the vector."""
    def plain():
        if nt is None:
            _store(builder, val, ptr, None)
        else:
            _streamed_or_not(builder, nt, lambda streamed: _store(builder, val, ptr, None,
                                                                  nt=streamed))

    def masked():
        _store(builder, val, ptr, _mask(builder, builder.sub(
            n, ir.Constant(_I64, q * lanes)), lanes), None)

    with builder.if_then(builder.icmp_signed(">", n, ir.Constant(_I64, q * lanes)), likely=True):
        _full_or_masked(builder, room, (q + 1) * lanes, plain, masked)


def _softmax_rows_intrinsic(f32: bool, nvec: int, rows: int = 1):
    """Build ``softmax_row{nvec}_f32|f64(x, g, i, c, labels, scale, grad, nt)`` for
    ``rows`` rows of ``c <= nvec * L`` classes each (``L`` = ``row_lanes``: 16 float32
    / 8 float64 with AVX-512, 8 / 4 with AVX2), row ``r`` at ``x[i+r*c:i+(r+1)*c]``
    with its label ``labels[r]``; it returns ``(s, mx)`` for each row in turn: ``mx``
    the row's max, ``s`` the sum of ``e = exp(x - mx)``, and, when ``grad``,
    ``g[...] = e * (scale / s)`` over the row, minus ``scale`` at its label (here
    rather than by the caller: a load from a masked store that has not reached the
    cache yet waits for it). Without ``grad`` nothing is stored (``g`` may be ``x``).
    With ``nt`` whole vectors are stored non-temporally (``&g[i]`` then 64-byte
    aligned, and ``c`` a whole number of vectors).

    A row is loaded once and stays in registers for the max, the exp, the sum and the
    scaling: whole vectors with plain loads and stores, the last, partial one masked.
    With ``rows`` > 1 the rows go through each step side by side (``_softmax_rows_ir``).
    The exps are float64's table exp (``exp_softmax``) and float32's
    ``_exp_softmax_f32`` (on 16 lanes a table exp, elsewhere the long-row kernel's), so
    the results match the long-row kernels' to an ulp or two of each exp and the order of
    the sum. The max ignores a NaN (it reaches the sum through its own exp anyway)."""
    dt = types.float32 if f32 else types.float64

    def ok(a):
        return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt

    def typer(typingctx, x, g, i, c, labels, scale, grad, nt):
        if not (ok(x) and ok(g) and scale == dt
                and isinstance(labels, types.UniTuple) and labels.count == rows
                and isinstance(labels.dtype, types.Integer)
                and all(isinstance(a, types.Boolean) for a in (grad, nt))
                and all(isinstance(a, types.Integer) for a in (i, c))):
            return None
        ret = types.UniTuple(dt, 2 * rows)

        def codegen(context, builder, sig, args):
            _aligned_frame(builder)
            out = _softmax_rows_ir(context, builder, sig, args, f32, nvec, rows)
            return context.make_tuple(builder, ret, out)

        return ret(x, g, i, c, labels, scale, grad, nt), codegen

    typer.__name__ = typer.__qualname__ = (
        f"softmax_row{nvec}{'' if rows == 1 else f'x{rows}'}_{'f32' if f32 else 'f64'}")
    return intrinsic(typer)


def _softmax_rows_ir(context, builder, sig, args, f32, nvec, rows):
    """The body of ``_softmax_rows_intrinsic``'s kernels: ``[s, mx]`` for each row in
    turn. Each step (load, max, exp, sum, store) is emitted for every row before the
    next step, so two rows' chains of dependent operations (max, then exp, then sum,
    then the division by it: some 170 cycles a row of 100 float32 classes on the Intel
    host) are in flight at once instead of one after the other."""
    lanes = row_lanes(f32)
    ft = _F32 if f32 else _F64
    vty = _row_vty(f32)
    i64 = context.cast(builder, args[2], sig.args[2], types.int64)
    c64 = context.cast(builder, args[3], sig.args[3], types.int64)
    sfx = _vec_name(vty)
    masks = [_mask(builder, builder.sub(c64, ir.Constant(_I64, q * lanes)), lanes)
             for q in range(nvec)]
    ptrs, xs = [], []
    for r in range(rows):
        start = builder.add(i64, builder.mul(c64, ir.Constant(_I64, r)))
        ptrs.append([])
        xs.append([])
        for q in range(nvec):
            base = builder.add(start, ir.Constant(_I64, q * lanes))
            px = builder.bitcast(_elem_ptr(context, builder, sig.args[0], args[0], base,
                                           types.int64), vty.as_pointer())
            ptrs[r].append(builder.bitcast(_elem_ptr(context, builder, sig.args[1], args[1],
                                                     base, types.int64), vty.as_pointer()))
            xs[r].append(_row_load(builder, px, c64, None, q, lanes, float("-inf")))
    vmax = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [vty, vty]), f"llvm.maxnum.{sfx}")
    rmax = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ft, [vty]), f"llvm.vector.reduce.fmax.{sfx}")
    mxs = []
    for r in range(rows):
        m = xs[r][0]
        for xv in xs[r][1:]:
            m = builder.call(vmax, [m, xv], fastmath=("nnan",))
        mxs.append(builder.call(rmax, [m], fastmath=("nnan",)))
    ws = [builder.fsub(xv, _splat(builder, mxs[r], vty)) for r in range(rows) for xv in xs[r]]
    flat = ([_exp_softmax_f32(builder, w) for w in ws] if f32
            else _exp_nonpos_f64(builder, ws))
    zero = ir.Constant(vty, [0.0] * lanes)
    es = [[builder.select(mk, e, zero) for mk, e in zip(masks, flat[r * nvec:(r + 1) * nvec])]
          for r in range(rows)]
    radd = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ft, [ft, vty]), f"llvm.vector.reduce.fadd.{sfx}")
    sums = []
    for r in range(rows):
        acc = es[r][0]
        for e in es[r][1:]:
            acc = builder.fadd(acc, e)
        sums.append(builder.call(radd, [ir.Constant(ft, -0.0), acc], fastmath=("reassoc",)))
    labels = cgutils.unpack_tuple(builder, args[4], rows)
    lty = sig.args[4].dtype
    with builder.if_then(args[6]):
        _streamed_or_not(builder, args[7], lambda streamed: [_softmax_row_grad(
            builder, c64, context.cast(builder, labels[r], lty, types.int64), args[5],
            es[r], ptrs[r], masks, sums[r], lanes, streamed) for r in range(rows)])
    return [v for r in range(rows) for v in (sums[r], mxs[r])]


def _softmax_row_grad(builder, c64, lab, scale, es, ptrs, masks, s, lanes, nt):
    """The gradient stores of ``softmax_row*`` for one row (``c64`` classes, label
    ``lab``): ``e * (scale / s)``, minus ``scale`` at the label; whole vectors
    non-temporal when ``nt``."""
    vty = es[0].type
    lane_ids = ir.Constant(ir.VectorType(_I64, lanes), list(range(lanes)))
    f = _splat(builder, builder.fdiv(scale, s), vty)
    sub = _splat(builder, scale, vty)
    for q, (e, p, mk) in enumerate(zip(es, ptrs, masks)):
        at = builder.icmp_signed("==", lane_ids, _splat(builder, builder.sub(
            lab, ir.Constant(_I64, q * lanes)), ir.VectorType(_I64, lanes)))
        val = builder.fmul(e, f)
        val = builder.select(at, builder.fsub(val, sub), val)

        def plain(val=val, p=p):
            _store(builder, val, p, None, nt=nt)

        def masked(val=val, p=p, mk=mk, q=q):
            with builder.if_then(builder.icmp_signed(
                    ">", c64, ir.Constant(_I64, q * lanes))):
                _store(builder, val, p, mk)

        # not _row_store: its order of tests (the row's end first) cost these
        # 8-vector rows 8-10%, and the other order cost layer norm's 50%
        _full_or_masked(builder, c64, (q + 1) * lanes, plain, masked)


# rows of up to 16 / 32 / 64 / 128 float32 (8 / 16 / 32 / 64 float64) classes
softmax_row1_f32, softmax_row2_f32, softmax_row4_f32, softmax_row8_f32 = (
    _softmax_rows_intrinsic(True, k) for k in (1, 2, 4, 8))
softmax_row1_f64, softmax_row2_f64, softmax_row4_f64, softmax_row8_f64 = (
    _softmax_rows_intrinsic(False, k) for k in (1, 2, 4, 8))
# the same, two rows side by side (the second at x[i+c:i+2c])
softmax_rows2 = {(f32, k): _softmax_rows_intrinsic(f32, k, 2)
                 for f32 in (True, False) for k in (1, 2, 4, 8)}
SHORT_ROW_VECTORS = (1, 2, 4, 8)  # vectors per row of the kernels above


def _hsum64(builder, v):
    """The sum of ``v``'s lanes in float64 (float32 lanes widened first)."""
    if v.type.element == _F32:
        v = builder.fpext(v, ir.VectorType(_F64, v.type.count))
    radd = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F64, [_F64, v.type]),
        f"llvm.vector.reduce.fadd.{_vec_name(v.type)}")
    return builder.call(radd, [ir.Constant(_F64, -0.0), v], fastmath=("reassoc",))


def _layer_norm_rows_intrinsic(backward: bool):
    """Build ``ln_row`` / ``ln_bwd_row``: layer norm of one row of ``d <= nvec * L``
    features (``L`` = ``row_lanes``: 16 float32 / 8 float64 with AVX-512, 8 / 4 with
    AVX2; ``nvec`` 1, 2, 4 or 8, a literal), the row held in registers from its load to its store.

    ``ln_row(x, y, gamma, beta, i, d, rin, rout, eps, nt, nvec) -> (mean, rstd)``:
    ``x[i:i+d]`` -> ``y[i:i+d]``; the row's sums run along lanes in x's dtype (at most
    ``nvec`` values each) and then across the lanes in float64; ``rstd = 1 / sqrt(var +
    eps)`` in float64; both rounded to x's dtype, as the long-row kernel stores and uses
    them. ``nt``: store whole vectors non-temporally (rows aligned to 64 bytes).

    ``ln_bwd_row(dy, x, gamma, dx, pg, pb, i, d, rin, rout, mean, rstd, nt, nvec)``:
    ``dx[i:i+d]``, and ``dy * xhat`` and ``dy`` added to the accumulators ``pg``, ``pb``
    (vector ``q`` of the row to ``[q*L, (q+1)*L)``, unmasked: they are at least ``nvec *
    L`` long and their lanes past the row are junk): float64, or the input's dtype (no
    widening; the caller moves them into float64 every few rows).

    ``gamma`` and ``beta`` are read as whole vectors: at least ``nvec * L`` long, zero
    past ``d``. ``rin``: elements that may be read from the row's start in x (and dy);
    ``rout``: elements that may be written from it in y (dx). Where they cover a partial
    vector it is loaded or stored whole, else masked (rows of 8 float32: 2.7 -> 1.8 ms at
    2^22 elements): the caller lets a row write into the next rows of its own chunk,
    which it writes afterwards. Vectors past the row are neither loaded nor stored."""

    def check(args):
        nvec = args[-1]
        if not (isinstance(nvec, types.IntegerLiteral) and nvec.literal_value in (1, 2, 4, 8)):
            return None
        dt = args[0].dtype if isinstance(args[0], types.Array) else None
        if dt not in (types.float32, types.float64):
            return None
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                   and a.dtype == dt for a in args[:4]):
            return None
        if backward and not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                                and a.dtype in (types.float64, dt) and a.dtype == args[4].dtype
                                for a in args[4:6]):
            return None
        nv = nvec.literal_value
        f32 = dt == types.float32
        ret = types.none if backward else types.UniTuple(dt, 2)

        def codegen(context, builder, sig, cargs):
            _aligned_frame(builder)
            lanes = row_lanes(f32)
            ft = _F32 if f32 else _F64
            vty = _row_vty(f32)
            zero = ir.Constant(vty, [0.0] * lanes)
            k_i = 6 if backward else 4
            i64, d64, rin, rout = (context.cast(builder, cargs[k], sig.args[k], types.int64)
                                   for k in range(k_i, k_i + 4))
            nt = context.cast(builder, cargs[-2], sig.args[-2], types.boolean)

            def ptr(k, q, at_row=True):
                base = ir.Constant(_I64, q * lanes)
                if at_row:
                    base = builder.add(i64, base)
                return builder.bitcast(_elem_ptr(context, builder, sig.args[k], cargs[k], base,
                                                 types.int64), vty.as_pointer())

            inside = [_mask(builder, builder.sub(d64, ir.Constant(_I64, q * lanes)), lanes)
                      for q in range(nv)]

            def row(k, at_row=True):
                """The row of array ``k``, its lanes past ``d`` 0 (a parameter vector:
                whole vectors from its start)."""
                if not at_row:
                    return [_load(builder, ptr(k, q, False), None) for q in range(nv)]
                return [_row_load(builder, ptr(k, q), d64, rin if nv <= 2 else None, q, lanes)
                        for q in range(nv)]

            def total(vs):
                acc = vs[0]
                for v in vs[1:]:
                    acc = builder.fadd(acc, v)
                return _hsum64(builder, acc)

            dinv = builder.fdiv(ir.Constant(_F64, 1.0), builder.sitofp(d64, _F64))
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.{_vec_name(vty)}")
            if not backward:
                xs = row(0)
                mu = builder.fmul(total(xs), dinv)
                mu_t = builder.fptrunc(mu, ft) if f32 else mu
                mus = _splat(builder, mu_t, vty)
                ts = [builder.select(m, builder.fsub(x, mus), zero) for m, x in zip(inside, xs)]
                sq = builder.fmul(ts[0], ts[0])
                for t in ts[1:]:
                    sq = builder.call(fma, [t, t, sq])
                eps = context.cast(builder, cargs[8], sig.args[8], types.float64)
                var = builder.fmul(_hsum64(builder, sq), dinv)
                sqrt = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(_F64, [_F64]), "llvm.sqrt.f64")
                r = builder.fdiv(ir.Constant(_F64, 1.0),
                                 builder.call(sqrt, [builder.fadd(var, eps)]))
                r_t = builder.fptrunc(r, ft) if f32 else r
                rs = _splat(builder, r_t, vty)
                gs, bs = row(2, False), row(3, False)
                for q, (t, g, b) in enumerate(zip(ts, gs, bs)):
                    val = builder.call(fma, [builder.fmul(t, rs), g, b])
                    _row_store(builder, val, ptr(1, q), d64, rout, q, lanes, nt)
                return context.make_tuple(builder, sig.return_type, [mu_t, r_t])
            xs, dys, gs = row(1), row(0), row(2, False)
            mus, rs = (_splat(builder, context.cast(builder, cargs[k], sig.args[k], dt), vty)
                       for k in (10, 11))
            xh = [builder.select(m, builder.fmul(builder.fsub(x, mus), rs), zero)
                  for m, x in zip(inside, xs)]
            g = [builder.fmul(dy, gm) for dy, gm in zip(dys, gs)]
            a = builder.fmul(total(g), dinv)
            gx = builder.fmul(g[0], xh[0])
            for q in range(1, nv):
                gx = builder.call(fma, [g[q], xh[q], gx])
            b = builder.fmul(_hsum64(builder, gx), dinv)
            a_t, b_t = (builder.fptrunc(a, ft), builder.fptrunc(b, ft)) if f32 else (a, b)
            av, nbv = _splat(builder, a_t, vty), _splat(builder, builder.fneg(b_t), vty)
            widen = f32 and sig.args[4].dtype == types.float64  # else shares in x's dtype
            sty = ir.VectorType(_F64, lanes) if widen else vty
            al = 8 if widen or not f32 else 4
            for q in range(nv):  # each dx vector stored before its sums: 10-15% faster
                val = builder.fmul(builder.call(fma, [xh[q], nbv, builder.fsub(g[q], av)]), rs)
                _row_store(builder, val, ptr(3, q), d64, rout, q, lanes, nt)
                with builder.if_then(builder.icmp_signed(">", d64, ir.Constant(_I64, q * lanes)),
                                     likely=True):
                    for k, add in ((4, builder.fmul(dys[q], xh[q])), (5, dys[q])):
                        p = builder.bitcast(_elem_ptr(context, builder, sig.args[k], cargs[k],
                                                      ir.Constant(_I64, q * lanes), types.int64),
                                            sty.as_pointer())
                        if widen:
                            add = builder.fpext(add, sty)
                        builder.store(builder.fadd(builder.load(p, align=al), add), p, align=al)
            return context.get_dummy_value()

        return ret(*args), codegen

    if backward:
        def typer(typingctx, dy, x, gamma, dx, pg, pb, i, d, rin, rout, mean, rstd, nt, nvec):
            return check((dy, x, gamma, dx, pg, pb, i, d, rin, rout, mean, rstd, nt, nvec))
    else:
        def typer(typingctx, x, y, gamma, beta, i, d, rin, rout, eps, nt, nvec):
            return check((x, y, gamma, beta, i, d, rin, rout, eps, nt, nvec))
    typer.__name__ = typer.__qualname__ = "ln_bwd_row" if backward else "ln_row"
    return intrinsic(typer)


ln_row = _layer_norm_rows_intrinsic(False)
ln_bwd_row = _layer_norm_rows_intrinsic(True)


def _permute2(builder, a, idx, b):
    """``vpermi2ps`` / ``vpermi2pd``: lane ``l`` of the result is lane ``idx[l]`` of ``a``
    (``idx[l] < L``) or lane ``idx[l] - L`` of ``b``; ``idx`` a list of ints."""
    vty = a.type
    f32 = vty.element == _F32
    if vty.count * elem_bytes(vty) != 64:  # AVX2: LLVM picks the shuffles
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, vty.count), idx))
    ity = ir.VectorType(_I32 if f32 else _I64, vty.count)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [vty, ity, vty]),
        f"llvm.x86.avx512.vpermi2var.{'ps' if f32 else 'pd'}.512")
    return builder.call(fn, [a, ir.Constant(ity, idx), b])


def _gather_lanes(builder, srcs, where):
    """The vector whose lane ``l`` is lane ``where[l][1]`` of ``srcs[where[l][0]]`` (all
    known when compiling): one two-source permute per pair of sources that gives it a
    lane, merged by constant masks."""
    lanes = srcs[0].type.count
    out = None
    for m in range((len(srcs) + 1) // 2):
        mine = [ln for ln in range(lanes) if where[ln][0] // 2 == m]
        if not mine:
            continue
        idx = [0] * lanes
        for ln in mine:
            k, at = where[ln]
            idx[ln] = (k - 2 * m) * lanes + at
        a = srcs[2 * m]
        p = _permute2(builder, a, idx, srcs[2 * m + 1] if 2 * m + 1 < len(srcs) else a)
        if out is None:
            out = p
        else:
            keep = ir.Constant(ir.VectorType(ir.IntType(1), lanes),
                               [ln in mine for ln in range(lanes)])
            out = builder.select(keep, p, out)
    return out


def _columns_of(builder, blocks):
    """Each block in ``blocks`` (``L`` rows of ``c`` elements held as ``c`` vectors, the
    rows one after another) -> ``c`` column vectors, lane ``r`` of column ``j`` = element
    ``j`` of row ``r`` (``_gather_lanes``: about ``c / 2`` permutes per column); column by
    column in turn, the blocks' instructions interleaved: one list of columns per
    block."""
    lanes, c = blocks[0][0].type.count, len(blocks[0])
    out = [[] for _ in blocks]
    for j in range(c):
        where = [divmod(r * c + j, lanes) for r in range(lanes)]
        for b, cols in zip(blocks, out):
            cols.append(_gather_lanes(builder, b, where))
    return out


def _rows_of(builder, blocks):
    """The inverse of ``_columns_of``: each block's ``c`` column vectors -> the ``c``
    vectors of its ``L`` rows laid out one after another, the blocks interleaved."""
    lanes, c = blocks[0][0].type.count, len(blocks[0])
    out = [[] for _ in blocks]
    for k in range(c):
        where = [((lanes * k + ln) % c, (lanes * k + ln) // c) for ln in range(lanes)]
        for b, rows in zip(blocks, out):
            rows.append(_gather_lanes(builder, b, where))
    return out


def _permute1(builder, a, idx):
    """``vpermps`` / ``vpermpd``: lane ``l`` of the result is lane ``idx[l]`` of ``a``."""
    vty = a.type
    f32 = vty.element == _F32
    if vty.count * elem_bytes(vty) != 64:  # AVX2: vpermps / vpermpd
        return builder.shuffle_vector(a, ir.Constant(vty, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, vty.count), idx))
    ity = ir.VectorType(_I32 if f32 else _I64, vty.count)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [vty, ity]),
        f"llvm.x86.avx512.permvar.{'sf' if f32 else 'df'}.512")
    return builder.call(fn, [a, ir.Constant(ity, idx)])


@functools.lru_cache(maxsize=None)
def row_lane_classes(c: int, lanes: int) -> tuple[tuple[int, ...], ...]:
    """For ``L`` = ``lanes`` rows of ``c`` elements held as ``c`` whole vectors (element
    ``t`` of row ``r`` at position ``r c + t``, so in lane ``(r c + t) mod L``): ``c``
    tuples ``cls[j]``, ``cls[j][r]`` the element of row ``r`` that column ``j`` holds,
    such that each row's ``c`` elements are spread over the ``c`` columns (any order) and,
    within a column, the ``L`` rows' elements sit in ``L`` different lanes.

    Rows and lanes form a bipartite graph with an edge per element; each row has ``c``
    edges and so has each lane (positions ``0 .. L c - 1`` fall ``c`` times on each lane),
    so by Koenig's theorem it splits into ``c`` perfect matchings, one per column, found
    here one after another by augmenting paths. A column is then gathered by blends only
    (each lane from the vector that holds it there) and one single-source permute that
    puts row ``r`` in lane ``r`` (``_columns_any``), instead of about ``c / 2``
    two-source permutes (``_columns_of``), which on this machine run on the FMA pipes at
    one 512-bit operation per cycle while blends run two per cycle beside them.
    Softmax blocks, one core in L2, cycles per block of 16 float32 rows: 10 classes 414
    -> 342, 12: 439 -> 405, 15: 651 -> 592; float64 (8 rows) 10: 385 -> 339; none
    faster where ``c`` is a multiple of ``L`` or at most ``L / 2``
    (``spread_columns``)."""
    left = [{t: (r * c + t) % lanes for t in range(c)} for r in range(lanes)]
    cls: list[tuple[int, ...]] = []
    for _ in range(c):
        owner: dict[int, tuple[int, int]] = {}  # lane -> (row, element)

        def augment(r: int, seen: set[int]) -> bool:
            for t, ln in left[r].items():
                if ln in seen:
                    continue
                seen.add(ln)
                if ln not in owner or augment(owner[ln][0], seen):
                    owner[ln] = (r, t)
                    return True
            return False

        for r in range(lanes):
            if not augment(r, set()):
                raise AssertionError(f"no perfect matching for c={c}, lanes={lanes}")
        col = [0] * lanes
        for r, t in owner.values():
            col[r] = t
            del left[r][t]
        cls.append(tuple(col))
    return tuple(cls)


def spread_columns(c: int, lanes: int) -> bool:
    """Whether blocks of ``c`` classes/features go through ``_columns_any`` (more than
    half a vector per row, not a whole number of vectors)."""
    return lanes // 2 < c and c % lanes != 0


def block_order(c: int, lanes: int) -> tuple[tuple[int, ...], ...]:
    """The element of its row that lane ``r`` of column ``j`` holds in the block kernels,
    ``[j][r]``: ``row_lane_classes`` where ``spread_columns``, else ``j``."""
    if spread_columns(c, lanes):
        return row_lane_classes(c, lanes)
    return tuple((j,) * lanes for j in range(c))


def _block_columns(builder, blocks):
    """The columns of each block (``_columns_any`` or ``_columns_of``, as
    ``spread_columns`` says), their lanes in the order ``block_order`` gives."""
    lanes, c = blocks[0][0].type.count, len(blocks[0])
    if spread_columns(c, lanes):
        return _columns_any(builder, blocks, row_lane_classes(c, lanes))
    return _columns_of(builder, blocks)


def _block_rows(builder, blocks):
    """The inverse of ``_block_columns``."""
    lanes, c = blocks[0][0].type.count, len(blocks[0])
    if spread_columns(c, lanes):
        return _rows_any(builder, blocks, row_lane_classes(c, lanes))
    return _rows_of(builder, blocks)


def _blend_tree(builder, parts):
    """One vector from ``parts`` [(lanes, vector)], the lane sets disjoint and covering
    every lane: lane ``l`` from the part that lists it, merged pairwise by constant-mask
    blends (a balanced tree, so the chain stays short)."""
    lanes = parts[0][1].type.count
    while len(parts) > 1:
        merged = []
        for a, b in zip(parts[0::2], parts[1::2]):
            keep = ir.Constant(ir.VectorType(ir.IntType(1), lanes),
                               [ln in a[0] for ln in range(lanes)])
            merged.append((a[0] | b[0], builder.select(keep, a[1], b[1])))
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0][1]


def _columns_any(builder, blocks, cls):
    """``_columns_of`` with each row's elements in the order ``cls`` gives
    (``row_lane_classes``): lane ``r`` of column ``j`` is element ``cls[j][r]`` of row
    ``r``. Per column: blends (each lane from the vector that holds that row's element
    there) and one single-source permute."""
    lanes, c = blocks[0][0].type.count, len(blocks[0])
    out = [[] for _ in blocks]
    for j in range(c):
        pos = [r * c + cls[j][r] for r in range(lanes)]
        src: dict[int, set[int]] = {}  # source vector -> the lanes taken from it
        for p in pos:
            src.setdefault(p // lanes, set()).add(p % lanes)
        for b, cols in zip(blocks, out):
            mixed = _blend_tree(builder, [(frozenset(s), b[k]) for k, s in sorted(src.items())])
            cols.append(_permute1(builder, mixed, [p % lanes for p in pos]))
    return out


def _rows_any(builder, blocks, cls):
    """The inverse of ``_columns_any``: each column permuted once (row ``r``'s element
    back to its lane in the row layout), then each row vector blended from the columns
    that hold its lanes."""
    lanes, c = blocks[0][0].type.count, len(blocks[0])
    where = {}  # position -> column
    fwd = []
    for j in range(c):
        idx = [0] * lanes
        for r in range(lanes):
            p = r * c + cls[j][r]
            where[p] = j
            idx[p % lanes] = r
        fwd.append(idx)
    out = [[] for _ in blocks]
    moved = [[_permute1(builder, cols[j], fwd[j]) for j in range(c)]
             for cols in blocks]
    for k in range(c):
        src: dict[int, set[int]] = {}
        for ln in range(lanes):
            src.setdefault(where[k * lanes + ln], set()).add(ln)
        for m, rows in zip(moved, out):
            rows.append(_blend_tree(builder, [(frozenset(s), m[j])
                                               for j, s in sorted(src.items())]))
    return out


def block_max_count(lanes: int, itemsize: int) -> int:
    """The most classes or features the block kernels compile for: ``2 L`` on 512-bit
    vectors, ``4 L`` on 256-bit ones (8 float32 / 4 float64 lanes, where the blocks
    still beat the row kernels from memory: softmax float32 17-32 classes 1.1-2.5x,
    float64 9-16 2.0-2.4x)."""
    return 2 * lanes if lanes * itemsize == 64 else 4 * lanes


def _count(c):
    """The count a kernel is compiled for: a literal int, or a tuple's length (a tuple of
    ``c`` zeros carries ``c`` in its type, so each count compiles once and is cached;
    ``numba.literally`` did the same but cost about 4 ms of dispatch per call)."""
    if isinstance(c, types.IntegerLiteral):
        return c.literal_value
    if isinstance(c, types.BaseTuple):
        return len(c)
    return None


# classes up to which softmax_block takes two blocks per call (by lanes: float32, float64)
SOFTMAX_PAIR_MAX_CLASSES = {(4, 16): 6, (8, 8): 8, (4, 8): 6, (8, 4): 6}


def softmax_blocks_per_call(c: int, lanes: int, itemsize: int) -> int:
    """Blocks of rows one ``softmax_block`` call takes for ``c`` classes: two for few
    classes (their steps interleaved, so the two blocks' dependency chains overlap), one
    above, where the second block's registers spill. 2^22 logits in cache, two against
    one: float32 2-6 classes 1.17-1.42x, 8: 1.03x, 10-24: 0.62-0.91x; float64 2-8
    1.07-1.25x, 10: 1.03x, 12: 0.90x. From memory (2^25): float32 4 / 6 / 8 classes
    1.09x / 1.23x / 0.91-0.93x, 2: 0.95x; float64 2-8 1.02-1.13x."""
    return 2 if c <= SOFTMAX_PAIR_MAX_CLASSES[itemsize, lanes] else 1


def _softmax_block_typer(typingctx, x, g, labels, prods, gaps, b, scale, grad, nt, c):
    """``softmax_block(x, g, labels, prods, gaps, b, scale, grad, nt, c)``: softmax +
    cross-entropy with its gradient (stored when ``grad`` is true; non-temporally when
    ``nt`` is, ``g`` then 64-byte aligned) for the ``W`` blocks of ``L`` rows of call
    ``b`` (blocks ``b*W .. b*W+W-1``, block ``k`` rows ``k*L .. k*L+L-1``; ``L`` =
    ``row_lanes``, ``W`` = ``softmax_blocks_per_call(c, L, itemsize)``, each block's
    steps interleaved with the other's) of ``c`` classes, ``2 <= c <=
    block_max_count(L, itemsize)`` known when compiling: ``c`` is a literal or a tuple
    of ``c`` items (whose type carries its length).

    The block is ``c`` whole vectors of ``x`` (``L`` rows of ``c``), loaded plainly and
    transposed in registers into ``c`` column vectors, one lane per row (two-source
    permutes, or where ``spread_columns`` blends and one permute per column, each
    row's classes then spread over the columns in the order ``row_lane_classes``
    gives, and the label compared with that order): max, exp, sum, scaling and the
    label's ``- scale`` then run on whole
    vectors for ``L`` rows at once, and the gradient is transposed back and stored as
    ``c`` whole vectors. No reduction across lanes, no masked load or store: the
    per-row kernel (``softmax_row*``) pays those for every row, which bounded a 10-class
    row at about 8 ns per core in cache. ``prods[b]``: the product of the block's row
    sums ``s`` (each in ``[1, c]``, so the product of 16 stays far from overflow);
    ``gaps[b]``: the sum of ``max - x[label]``; the block's loss is ``log(prods[b]) +
    gaps[b]``, one log per block (``b`` a block's index here, not the call's). The exps
    are those of the other softmax kernels."""
    ncls = _count(c)
    dt = x.dtype if isinstance(x, types.Array) else None
    if dt not in (types.float32, types.float64) or scale != dt:
        return None
    f32 = dt == types.float32
    lanes = row_lanes(f32)
    if ncls is None or not 2 <= ncls <= block_max_count(lanes, 4 if f32 else 8):
        return None

    def codegen(context, builder, sig, args):
        _aligned_frame(builder)
        vty = _row_vty(f32)
        ity = ir.VectorType(_I32 if f32 else _I64, lanes)
        d64 = ir.VectorType(_F64, lanes)
        W = softmax_blocks_per_call(ncls, lanes, 4 if f32 else 8)
        each = range(W)
        first = builder.mul(context.cast(builder, args[5], sig.args[5], types.int64),
                            ir.Constant(_I64, W))
        blk = [builder.add(first, ir.Constant(_I64, w)) for w in each]
        row0 = [builder.mul(b_, ir.Constant(_I64, lanes)) for b_ in blk]
        base = [builder.mul(r_, ir.Constant(_I64, ncls)) for r_ in row0]

        def ptr(k, at, ty):
            return builder.bitcast(_elem_ptr(context, builder, sig.args[k], args[k], at,
                                             types.int64), ty.as_pointer())

        def at(w, k):
            return builder.add(base[w], ir.Constant(_I64, k * lanes))

        src = [[_load(builder, ptr(0, at(w, k), vty), None) for k in range(ncls)]
               for w in each]
        # the W blocks' steps interleaved, so their dependency chains overlap
        cls = block_order(ncls, lanes)
        cols = _block_columns(builder, src)
        vmax = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty]), f"llvm.maxnum.{_vec_name(vty)}")

        def fold(op, vecs):  # pairwise (float32 in cache 1.0-1.14x), blocks in turn
            level = [list(v) for v in vecs]
            while len(level[0]) > 1:
                pairs = range(0, len(level[0]) - 1, 2)
                nxt = [[op(level[w][i], level[w][i + 1]) for i in pairs] for w in each]
                level = [nxt[w] + level[w][len(level[w]) // 2 * 2:] for w in each]
            return [lv[0] for lv in level]

        lab = []
        for w in each:
            v = _load(builder, ptr(2, row0[w], ir.VectorType(_I64, lanes)), None)
            lab.append(builder.trunc(v, ity) if f32 else v)
        # the label's logit picked before the exps, so the columns are dead once their
        # exps are taken (picked with the gradient's selects at the end, as before, they
        # stayed live beside the exps: float64 6 / 8 classes 1.14x / 1.04-1.09x, others
        # 1.00-1.04x, Zen 4 host, 2^18 logits, A/B in one process)
        xl = [cols[w][0] for w in each]
        for jc in range(1, ncls):
            for w in each:
                hit = builder.icmp_signed("==", lab[w], ir.Constant(ity, cls[jc]))
                xl[w] = builder.select(hit, cols[w][jc], xl[w])
        mx = fold(lambda a, v: builder.call(vmax, [a, v], fastmath=("nnan",)), cols)
        if f32:
            es = [[None] * ncls for _ in each]
            for jc in range(ncls):
                for w in each:
                    es[w][jc] = _exp_softmax_f32(builder, builder.fsub(cols[w][jc], mx[w]))
        else:
            flat = _exp_nonpos_f64(builder, [builder.fsub(cols[w][jc], mx[w])
                                             for jc in range(ncls) for w in each])
            es = [[flat[jc * W + w] for jc in range(ncls)] for w in each]
        ssum = fold(builder.fadd, es)
        sc = _splat(builder, args[6], vty)
        f = [builder.fdiv(sc, ssum[w]) for w in each]
        grads = [[] for _ in each]
        for jc in range(ncls):
            for w in each:
                hit = builder.icmp_signed("==", lab[w], ir.Constant(ity, cls[jc]))
                val = builder.fmul(es[w][jc], f[w])
                grads[w].append(builder.select(hit, builder.fsub(val, sc), val))
        wide = (lambda v: builder.fpext(v, d64)) if f32 else (lambda v: v)
        rmul = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F64, [_F64, d64]),
            f"llvm.vector.reduce.fmul.{_vec_name(d64)}")
        for w in each:
            prod = builder.call(rmul, [ir.Constant(_F64, 1.0), wide(ssum[w])],
                                fastmath=("reassoc",))
            gap = _hsum64(builder, builder.fsub(wide(mx[w]), wide(xl[w])))
            builder.store(prod, _elem_ptr(context, builder, sig.args[3], args[3], blk[w],
                                          types.int64))
            builder.store(gap, _elem_ptr(context, builder, sig.args[4], args[4], blk[w],
                                         types.int64))
        want = context.cast(builder, args[7], sig.args[7], types.boolean)
        nt = context.cast(builder, args[8], sig.args[8], types.boolean)
        with builder.if_then(want, likely=True):
            rows = _block_rows(builder, grads)

            def store_rows(streamed):
                for k in range(ncls):
                    for w in each:
                        _store(builder, rows[w][k], ptr(1, at(w, k), vty), None, nt=streamed)

            _streamed_or_not(builder, nt, store_rows)
        return context.get_dummy_value()

    return types.none(x, g, labels, prods, gaps, b, scale, grad, nt, c), codegen


_softmax_block_typer.__name__ = _softmax_block_typer.__qualname__ = "softmax_block"
softmax_block = intrinsic(_softmax_block_typer)


def _pairwise_sum(builder, vs):
    """``sum(vs)`` lane by lane as a balanced tree (the error of ``len(vs)`` terms grows
    with its depth, ``log2``, not with the count)."""
    level = list(vs)
    while len(level) > 1:
        pairs = [builder.fadd(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = pairs + level[len(level) // 2 * 2:]
    return level[0]


def _layer_norm_block_intrinsic(backward: bool, mode: int = 0):
    """Build ``ln_block`` / ``ln_bwd_block``: layer norm of the ``L`` rows of block ``b``
    (``L`` = ``row_lanes``: 16 float32 / 8 float64 with AVX-512, 8 / 4 with AVX2) of
    ``d`` features, ``d`` known when compiling (``_count``), the block held as ``d``
    whole vectors and transposed in registers into ``d`` columns of one row per lane
    (as ``softmax_block``).

    ``ln_block(x, y, gamma, beta, mean, rstd, b, eps, nt, d)``: a row's mean and variance are
    sums over the columns, in the input's dtype (float32: pairwise, the mean corrected
    by the mean of ``x - mean``, so it is as close as a float64 sum's; widening the
    columns to float64 instead cost 1.2-2x, below); ``mean``/``rstd`` of
    the ``L`` rows are one vector store each. ``y`` is computed in the row layout from
    the loaded vectors, each vector's rows' mean and rstd brought to its lanes by one
    single-source permute each, ``gamma`` and ``beta`` given tiled ``L`` times (``d L``
    values, element ``p`` of a block has feature ``p mod d``): no transpose back. One
    core in L2, cycles per block against transposing ``y`` back: float32 8 / 10 / 14
    features 307 / 346 / 487 -> 222 / 281 / 380, float64 8 / 10: 183 / 212 -> 119 / 154.

    ``mode`` 1 and 2 split the forward in two (``ln_block_stats``: ``mean`` and ``rstd``
    only; ``ln_block_apply``: ``y`` from the ``mean`` and ``rstd`` stored), so that a
    caller can take the statistics of several blocks before their outputs
    (``kernels.nn._ln_fwd_blocks_chunk``): one block at a time waits on its own chain.

    ``ln_bwd_block(dy, x, gamma, dx, mean, rstd, pg, pb, b, nt, d)``: ``dx``, and for each
    column ``j`` the lanes of ``dy * xhat`` and ``dy`` added to ``pg[j*L:(j+1)*L]`` and
    ``pb[...]`` (float64, or the input's dtype: then no widening, and the caller moves
    them into float64 every few blocks; the caller sums the lanes). The row sums
    ``mean(dy * gamma)`` and ``mean(dy * gamma * xhat)`` run over the columns in the
    input's dtype (float32 pairwise).

    float32 sums in float32 instead of widened to float64 (2026-12-04, Zen 4 host,
    A/B in one process, ns per element per core): forward in cache 4 / 10 / 20 features
    1.98x / 1.69x / 1.26x, from memory (2^25) 10 features 1.17-1.24x; backward in
    cache 1.31x / 1.09x / 1.10x, from memory 1.05x.

    Where ``spread_columns(d, L)`` the columns come from ``_columns_any``: lane ``r`` of
    column ``j`` holds feature ``block_order(d, L)[j][r]``, so the backward's
    ``gamma`` is then a ``(d, L)`` array spread the same way (one vector load per
    column) and the caller adds lane ``r`` of ``pg[j*L:(j+1)*L]`` to that feature
    (``block_order``; ``kernels.nn._block_params``)."""

    def check(args):
        d = _count(args[-1])
        dt = args[0].dtype if isinstance(args[0], types.Array) else None
        if dt not in (types.float32, types.float64):
            return None
        lanes = row_lanes(dt == types.float32)
        if d is None or not 1 <= d <= block_max_count(lanes, 4 if dt == types.float32 else 8):
            return None
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                   and a.dtype == dt for a in args[:6]):
            return None
        if backward and not all(isinstance(a, types.Array) and a.dtype in (types.float64, dt)
                                and a.dtype == args[6].dtype for a in args[6:8]):
            return None
        f32 = dt == types.float32

        def codegen(context, builder, sig, cargs):
            _aligned_frame(builder)
            vty = _row_vty(f32)
            d64v = ir.VectorType(_F64, lanes)
            kb = 8 if backward else 6
            blk = context.cast(builder, cargs[kb], sig.args[kb], types.int64)
            row0 = builder.mul(blk, ir.Constant(_I64, lanes))
            base = builder.mul(row0, ir.Constant(_I64, d))

            def ptr(k, at, ty=vty):
                return builder.bitcast(_elem_ptr(context, builder, sig.args[k], cargs[k], at,
                                                 types.int64), ty.as_pointer())

            spread = spread_columns(d, lanes)

            def load_rows(k):
                return [_load(builder, ptr(k, builder.add(base, ir.Constant(_I64, q * lanes))),
                              None) for q in range(d)]

            def block(k, vecs=None):
                return _block_columns(builder, [load_rows(k) if vecs is None else vecs])[0]

            ntv = context.cast(builder, cargs[kb + (1 if backward else 2)],
                               sig.args[kb + (1 if backward else 2)], types.boolean)

            def put_rows(k, make):
                """The block's ``d`` row-layout vectors (``make()``, built in each
                branch) stored, non-temporally where ``nt`` (a block is ``64 d`` bytes:
                whole lines where the array is 64-byte aligned)."""
                def emit(streamed):
                    for q, vec in enumerate(make()):
                        at = builder.add(base, ir.Constant(_I64, q * lanes))
                        _store(builder, vec, ptr(k, at), None, nt=streamed)
                _streamed_or_not(builder, ntv, emit)

            def put(k, cols):
                put_rows(k, lambda: _block_rows(builder, [cols])[0])

            def param(k, j):  # spread: column j's lanes of the (d, L) array
                if spread:
                    return _load(builder, ptr(k, ir.Constant(_I64, j * lanes)), None)
                v = builder.load(_elem_ptr(context, builder, sig.args[k], cargs[k],
                                           ir.Constant(_I64, j), types.int64))
                return _splat(builder, v, vty)

            def wide(v):
                return builder.fpext(v, d64v) if f32 else v

            def total(vs):
                """The columns' sum: float32 pairwise (below), float64 in order."""
                if f32:
                    return _pairwise_sum(builder, vs)
                acc = vs[0]
                for v in vs[1:]:
                    acc = builder.fadd(acc, v)
                return acc

            # float32 sums stay float32 (pairwise: at most 32 columns, so 5 levels), the
            # mean corrected by the mean of x - mean (below); float64 widening cost
            # 1.2-2x on the Zen 4 host
            sty = vty if f32 else d64v
            dinv = _splat(builder, ir.Constant(_F32 if f32 else _F64,
                                               _to_f32(1.0 / d) if f32 else 1.0 / d), sty)
            def stats(xrows):
                """The rows' ``(mean, rstd)``, one lane per row (float32: the mean's
                rounding measured and taken out, below)."""
                cols = block(0, xrows)
                mu_t = builder.fmul(total(cols), dinv)
                ts = [builder.fsub(v, mu_t) for v in cols]
                if f32:  # the float32 sum's rounding, measured and taken out: the mean as
                    # close as a float64 sum's, the variance not biased by its error
                    corr = builder.fmul(total(ts), dinv)
                    mu_t = builder.fadd(mu_t, corr)
                    ts = [builder.fsub(t, corr) for t in ts]
                ss = total([builder.fmul(t, t) for t in ts])
                ety = types.float32 if f32 else types.float64
                eps = _splat(builder, context.cast(builder, cargs[7], sig.args[7], ety), sty)
                sqrt = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(sty, [sty]), f"llvm.sqrt.{_vec_name(sty)}")
                one = _splat(builder, ir.Constant(_F32 if f32 else _F64, 1.0), sty)
                return mu_t, builder.fdiv(one, builder.call(
                    sqrt, [builder.fadd(builder.fmul(ss, dinv), eps)]))

            if not backward:
                xrows = load_rows(0)
                if mode == 2:  # the outputs only: mean and rstd read back
                    mu_t = _load(builder, ptr(4, row0), None)
                    r_t = _load(builder, ptr(5, row0), None)
                else:
                    mu_t, r_t = stats(xrows)
                    _store(builder, mu_t, ptr(4, row0), None)
                    _store(builder, r_t, ptr(5, row0), None)
                    if mode == 1:  # the statistics only
                        return context.get_dummy_value()

                # y in the row layout, no transpose back: each vector's rows' mean and rstd
                # by one permute each, gamma and beta tiled over the block
                def y_rows():
                    for q, xv in enumerate(xrows):
                        idx = [(q * lanes + ln) // d for ln in range(lanes)]
                        at_q = ir.Constant(_I64, q * lanes)
                        t = builder.fsub(xv, _permute1(builder, mu_t, idx))
                        t = builder.fmul(builder.fmul(t, _permute1(builder, r_t, idx)),
                                         _load(builder, ptr(2, at_q), None))
                        yield builder.fadd(t, _load(builder, ptr(3, at_q), None))
                put_rows(1, y_rows)
                return context.get_dummy_value()
            dys, xs = block(0), block(1)
            mu = _load(builder, ptr(4, row0), None)
            r = _load(builder, ptr(5, row0), None)
            xh = [builder.fmul(builder.fsub(v, mu), r) for v in xs]
            g = [builder.fmul(dy, param(2, j)) for j, dy in enumerate(dys)]
            a = builder.fmul(total(g), dinv)
            bb = builder.fmul(total([builder.fmul(gj, h) for gj, h in zip(g, xh)]), dinv)
            put(3, [builder.fmul(builder.fsub(builder.fsub(gj, a), builder.fmul(h, bb)), r)
                    for gj, h in zip(g, xh)])
            same = sig.args[6].dtype == sig.args[0].dtype  # partial sums in the dtype
            for j, (dy, h) in enumerate(zip(dys, xh)):
                for k, add in ((6, builder.fmul(dy, h)), (7, dy)):
                    p = ptr(k, ir.Constant(_I64, j * lanes), vty if same else d64v)
                    al = 4 if same and f32 else 8
                    builder.store(builder.fadd(builder.load(p, align=al),
                                               add if same else wide(add)), p, align=al)
            return context.get_dummy_value()

        return types.none(*args), codegen

    if backward:
        def typer(typingctx, dy, x, gamma, dx, mean, rstd, pg, pb, b, nt, d):
            return check((dy, x, gamma, dx, mean, rstd, pg, pb, b, nt, d))
    else:
        def typer(typingctx, x, y, gamma, beta, mean, rstd, b, eps, nt, d):
            return check((x, y, gamma, beta, mean, rstd, b, eps, nt, d))
    typer.__name__ = typer.__qualname__ = ("ln_bwd_block" if backward else "ln_block") + (
        "", "_stats", "_apply")[mode]
    return intrinsic(typer)


ln_block = _layer_norm_block_intrinsic(False)
ln_block_stats = _layer_norm_block_intrinsic(False, 1)
ln_block_apply = _layer_norm_block_intrinsic(False, 2)
ln_bwd_block = _layer_norm_block_intrinsic(True)
