"""The fixed questions every twin answers: evaluation samples, export proofs, sweep reports.

Requests an ML-engineering writer answers, none of them in the training split.
The first is the one the Handbook's authors used to pick their twin (ch. 6).
"""

FIXED_QUESTIONS = (
    "Write a paragraph to introduce supervised fine-tuning.",
    "What is the difference between LoRA and QLoRA?",
    "Explain the KV cache to a new engineer on my team.",
    "When should I use retrieval-augmented generation instead of fine-tuning?",
    "Give me one piece of practical advice about evaluating a chatbot.",
    "Write a short note for my blog on why data quality matters more than data size.",
    "How do I know if my model is overfitting?",
    "What does the beta parameter do in DPO?",
)
