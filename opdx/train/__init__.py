"""The on-policy distillation trainer.

    torchrun --nproc_per_node 2 -m opdx.train                                   # the embedded demo
    torchrun --nproc_per_node N -m opdx.train --config examples/configs/X.yaml loss.beta=1.0 ...

One module per concern (importing this package loads none of them):

- `loop`        main(argv) / run(cfg): the step loop (prompts -> source draw -> sequences -> teacher signal ->
                objective -> backward/step -> rollout weight sync -> log / eval / checkpoint)
- `build`       build(cfg) -> Trainer: validation, model dirs, tokenizers, DeepSpeed engine, teacher, rollout
- `optimizer`   the student's DeepSpeed engine: AdamW implementation (optim.impl), lr schedule, DeepSpeed config
- `objectives`  one class per loss.kind (opd, gjsd, topk, sft, minillm, uld, gold) behind signal_spec() / loss(); distill_step
- `xtok_scoring` the cross-tokenizer teacher (uld / gold): re-tokenize, align by bytes, merge per group
- `scoring`     the student views the objectives score through (logits, fused-linear, top-k from hidden states)
- `sources`     the λ / seq_kd / dataset draw (rank 0, broadcast) and the micro-batch's sequences
- `evaluate`    held-out reverse KL, top-1 agreement, task accuracy
- `checkpoint`  atomic checkpoints, resume, the final save_pretrained model
- `distributed` rank / world / barrier / broadcast / all-reduce over torch.distributed
- `logging`     metrics.jsonl, TensorBoard, the tqdm bar, the phase timer, summary.json
"""
