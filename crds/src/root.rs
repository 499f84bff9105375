//! The root type of a custom resource whose constructor accepts anything that
//! converts into its spec.
//!
//! `#[derive(CustomResource)]` generates `Kind::new(name, spec: Spec)`. The
//! NodePolicySet and PeerSet objects grew a sharded form, but the plain form
//! (everything inline, what people and tests write by hand) must keep
//! reading as before: `NodePolicySet::new(node, NodePolicySetSpec { .. })`.
//! So the derive runs on the spec with a *schema twin* root (it provides the
//! CRD, names and printer columns), and this macro writes the public root
//! with a `new(name, impl Into<Spec>)`.

/// Declares `$root` (metadata, spec, status) as the cluster-scoped custom
/// resource described by `$twin` (a `#[derive(CustomResource)]` root).
macro_rules! custom_resource_root {
    ($(#[$meta:meta])* $root:ident, twin = $twin:ty, spec = $spec:ty, status = $status:ty) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $root {
            /// Standard object metadata.
            pub metadata: ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            /// The spec.
            pub spec: $spec,
            /// The status.
            pub status: Option<$status>,
        }

        impl $root {
            /// An object named `name` with `spec` (no status).
            pub fn new(name: &str, spec: impl Into<$spec>) -> Self {
                $root {
                    metadata: ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: Some(name.to_string()),
                        ..Default::default()
                    },
                    spec: spec.into(),
                    status: None,
                }
            }
        }

        impl ::kube::Resource for $root {
            type DynamicType = ();
            type Scope = ::kube::core::ClusterResourceScope;

            fn kind(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$twin as ::kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$twin as ::kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$twin as ::kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> ::std::borrow::Cow<'_, str> {
                <$twin as ::kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(
                &mut self,
            ) -> &mut ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }

        impl ::kube::CustomResourceExt for $root {
            fn crd() -> ::k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
                <$twin as ::kube::CustomResourceExt>::crd()
            }
            fn crd_name() -> &'static str {
                <$twin as ::kube::CustomResourceExt>::crd_name()
            }
            fn api_resource() -> ::kube::core::ApiResource {
                <$twin as ::kube::CustomResourceExt>::api_resource()
            }
            fn shortnames() -> &'static [&'static str] {
                <$twin as ::kube::CustomResourceExt>::shortnames()
            }
        }

        impl ::serde::Serialize for $root {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                #[derive(::serde::Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Repr<'a> {
                    api_version: &'a str,
                    kind: &'a str,
                    metadata: &'a ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                    spec: &'a $spec,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    status: &'a Option<$status>,
                }
                let api_version = <$root as ::kube::Resource>::api_version(&());
                let kind = <$root as ::kube::Resource>::kind(&());
                Repr {
                    api_version: &api_version,
                    kind: &kind,
                    metadata: &self.metadata,
                    spec: &self.spec,
                    status: &self.status,
                }
                .serialize(s)
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $root {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // apiVersion and kind are not checked: the Api this came
                // from fixes them.
                #[derive(::serde::Deserialize)]
                struct Repr {
                    #[serde(default)]
                    metadata: ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                    #[serde(default)]
                    spec: $spec,
                    #[serde(default)]
                    status: Option<$status>,
                }
                let r = Repr::deserialize(d)?;
                Ok($root {
                    metadata: r.metadata,
                    spec: r.spec,
                    status: r.status,
                })
            }
        }

        impl ::kube::core::object::HasSpec for $root {
            type Spec = $spec;
            fn spec(&self) -> &$spec {
                &self.spec
            }
            fn spec_mut(&mut self) -> &mut $spec {
                &mut self.spec
            }
        }

        impl ::kube::core::object::HasStatus for $root {
            type Status = $status;
            fn status(&self) -> Option<&$status> {
                self.status.as_ref()
            }
            fn status_mut(&mut self) -> &mut Option<$status> {
                &mut self.status
            }
        }
    };
}

pub(crate) use custom_resource_root;
