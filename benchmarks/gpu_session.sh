#!/usr/bin/env bash
# The GPU measurements benchmarks/RESULTS.md is waiting for, in parts that each fit one
# 10-minute device command (run from the repository root, torch with CUDA and diffusers installed):
#
#   bash benchmarks/gpu_session.sh checks     # GPU correctness: parity, cuDNN/flex attention, KV cache, compile
#   bash benchmarks/gpu_session.sh model      # 1.3B train step vs diffusers, AC attention with 0/12/16/20 blocks skipped
#   bash benchmarks/gpu_session.sh fp8        # 1.3B forward + train step with FP8 GEMMs (torchao rowwise / tensorwise)
#   bash benchmarks/gpu_session.sh fsdp       # FSDP2 1.3B step (re-measure after the input-cast fix), AC full/attention
#   bash benchmarks/gpu_session.sh serving    # 1.3B student at 480p: clean vs last-step KV refresh, window 6 vs 3, CUDA graphs, Wan VAE
#                                             # decode, and the light decoder's decode against the Wan VAE's
#   bash benchmarks/gpu_session.sh priority   # when one command is all the device time there is (~9 min): the checks, then
#                                             # the unmeasured levers the goals wait on (serving CUDA graphs, the light
#                                             # decoder's speed, AC skip),
#                                             # each step under its own time limit so a slow one cannot take the rest
#
# The device image lacks diffusers, omegaconf, ftfy and torchao: build them here with
# `bash benchmarks/gpu_deps.sh`, carry `.gpu_deps` and run with PYTHONPATH=$PWD/.gpu_deps:$PWD.
#
# Results go to $OUT (default ./gpu_results) as text logs (+ JSON where the benchmark writes one).
set -euo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
part=${1:?usage: gpu_session.sh checks|model|fp8|fsdp|serving|priority}
py=${PYTHON:-python3}

case "$part" in
  checks)
    $py -m benchmarks.gpu_checks 2>&1 | tee "$OUT/gpu_checks.txt"
    ;;
  model)
    $py -m benchmarks.bench_model --model wan2.1-1.3b --phases train \
      --variants compile-attention,compile-attention:12,compile-attention:16,compile-attention:20 2>&1 | tee "$OUT/bench_model_1.3b.txt"
    ;;
  fp8)
    $py -m benchmarks.bench_model --model wan2.1-1.3b --phases fwd,train \
      --variants compile-attention,compile-attention+rowwise,compile-attention+tensorwise 2>&1 | tee "$OUT/bench_model_1.3b_fp8.txt"
    ;;
  fsdp)
    for ac in full attention; do
      torchrun --standalone --nproc-per-node 1 -m benchmarks.bench_parallel step --model wan2.1-1.3b --frames 81 --ac "$ac" 2>&1 \
        | tee "$OUT/bench_parallel_step_$ac.txt"
    done
    ;;
  serving)
    # TinyCodec with 16 low-frequency channels at stride 8 has the Wan VAE's latent interface
    # (16 x T/4 x H/8 x W/8): the DiT cost is the real model's; the decode column is not the VAE's.
    common=(--config serving/gpu-1.3b-480p.yaml --chunks 60 data.codec.kind=tiny data.codec.channels=16
            data.text_encoder.kind=tiny)
    for lever in serving.kv_refresh=clean serving.kv_refresh=last_step "serving.kv_refresh=last_step serving.window_frames=3" \
                 "serving.kv_refresh=last_step serving.cuda_graphs=true" \
                 "serving.kv_refresh=last_step serving.cuda_graphs=true serving.compile=false"; do
      tag=$(echo "$lever" | tr ' =' '__')
      # shellcheck disable=SC2086
      $py -m benchmarks.bench_serving "${common[@]}" $lever --json "$OUT/serving_$tag.json" 2>&1 | tee "$OUT/serving_$tag.txt"
    done
    # the real decoder's cost: the Wan2.1 VAE's architecture (random weights), streamed chunk by chunk in bf16
    $py -m benchmarks.bench_serving --config serving/gpu-1.3b-480p.yaml --chunks 30 --random-vae data.text_encoder.kind=tiny \
      serving.kv_refresh=last_step --json "$OUT/serving_wan_vae.json" 2>&1 | tee "$OUT/serving_wan_vae.txt"
    # the Wan VAE's streaming decode vs the light decoder's (random weights: same cost), 480p bf16
    $py -m benchmarks.bench_decoder --json "$OUT/decoder.json" 2>&1 | tee "$OUT/decoder.txt"
    ;;
  priority)
    serving=(--config serving/gpu-1.3b-480p.yaml --chunks 40 data.codec.kind=tiny data.codec.channels=16
             data.text_encoder.kind=tiny serving.kv_refresh=last_step)
    timeout 150 $py -m benchmarks.gpu_checks 2>&1 | tee "$OUT/gpu_checks.txt" || true
    timeout 100 $py -m benchmarks.bench_serving "${serving[@]}" --json "$OUT/serving_last_step.json" 2>&1 \
      | tee "$OUT/serving_last_step.txt" || true
    timeout 100 $py -m benchmarks.bench_serving "${serving[@]}" serving.cuda_graphs=true --json "$OUT/serving_graphs.json" 2>&1 \
      | tee "$OUT/serving_graphs.txt" || true
    timeout 60 $py -m benchmarks.bench_decoder --json "$OUT/decoder.json" 2>&1 | tee "$OUT/decoder.txt" || true
    timeout 180 $py -m benchmarks.bench_model --model wan2.1-1.3b --phases train \
      --variants compile-attention,compile-attention:16 --warmup 1 --iters 3 2>&1 | tee "$OUT/bench_model_1.3b.txt" || true
    ;;
  *)
    echo "unknown part: $part (checks|model|fp8|fsdp|serving|priority)" >&2
    exit 2
    ;;
esac
