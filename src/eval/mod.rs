//! Evaluation of scores and circuits: ROC/AUC, faithfulness curves, correlation.
