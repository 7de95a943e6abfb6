//! ambit's chained CNI plugin (binary `ambit-cni`) and its protocol with the node agent. The
//! agent depends on this library for [`proto`]; the plugin itself is [`plugin::run`].

pub mod enrolment;
pub mod kube;
pub mod plugin;
pub mod proto;
pub mod spec;
