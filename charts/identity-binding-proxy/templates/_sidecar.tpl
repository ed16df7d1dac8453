{{/*
The proxy as a native sidecar of a workload (mode: sidecar). Helm cannot patch another
chart's pods, so a workload chart that depends on this chart includes these templates in its
own pod template (docs/sidecar.md, "With Helm"). Each takes THIS chart's context, which the
parent reaches through .Subcharts (keyed by the dependency's alias, or its name):

  {{- $ibp := index .Subcharts "identity-binding-proxy" }}
  ...
      annotations:
        {{- include "identity-binding-proxy.sidecar.podAnnotations" $ibp | nindent 8 }}
    spec:
      initContainers:
        {{- include "identity-binding-proxy.sidecar.initContainer" $ibp | nindent 8 }}
      containers:
        - name: app
          env:
            {{- include "identity-binding-proxy.sidecar.appEnv" $ibp | nindent 12 }}
          volumeMounts:
            {{- include "identity-binding-proxy.sidecar.appVolumeMounts" $ibp | nindent 12 }}
      volumes:
        {{- include "identity-binding-proxy.sidecar.volumes" $ibp | nindent 8 }}

The same templates render deploy/components/sidecar/sidecar.yaml (scripts/render-deploy.sh):
the kustomize component and the chart are one source.
*/}}

{{/* The settings the sidecar reads once at start (envFrom), in the workload's namespace. */}}
{{- define "ibp.sidecar.settings" -}}
IBP_ISSUER_URL: {{ required "issuer.url is required" .Values.issuer.url | quote }}
IBP_AUTHORITY_HOST: {{ .Values.authorityHost | quote }}
IBP_TOKEN_AUDIENCE: {{ .Values.tokenAudience | quote }}
IBP_LOG_FORMAT: {{ .Values.logFormat | quote }}
{{- end -}}

{{/* Refuses a context that is not this chart's in sidecar mode. */}}
{{- define "ibp.sidecar.check" -}}
{{- if not (and .Values .Values.mode .Chart .Release) -}}
{{- fail "identity-binding-proxy.sidecar.*: pass the identity-binding-proxy dependency's context, e.g. (index .Subcharts \"identity-binding-proxy\") (docs/sidecar.md)" -}}
{{- end -}}
{{- if and .Capabilities (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "identity-binding-proxy.sidecar.*: a native sidecar (an init container with restartPolicy: Always) needs Kubernetes 1.29 or later, not %s" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if ne .Values.mode "sidecar" -}}
{{- fail "identity-binding-proxy.sidecar.*: set mode: sidecar in the identity-binding-proxy dependency's values (it renders the ConfigMaps the sidecar reads)" -}}
{{- end -}}
{{- end -}}

{{/* The pod template's annotations (a map's entries). */}}
{{- define "identity-binding-proxy.sidecar.podAnnotations" -}}
{{- include "ibp.sidecar.check" . -}}
# The workload identity webhook injects the AZURE_* settings and the projected token
# into the app, not into the sidecar (which uses its own API token, mounted below).
azure.workload.identity/skip-containers: identity-binding-proxy
{{- if not .Values.kustomize }}
# The settings are read once at start: a change rolls the pods.
checksum/identity-binding-proxy-settings: {{ include "ibp.sidecar.settings" . | sha256sum }}
{{- end }}
{{- end -}}

{{/* The sidecar: one item of the pod's initContainers. */}}
{{- define "identity-binding-proxy.sidecar.initContainer" -}}
{{- include "ibp.sidecar.check" . -}}
{{- $name := include "ibp.fullname" . -}}
- name: identity-binding-proxy
  image: {{ include "ibp.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # A native sidecar: started before the app containers, kept running beside them,
  # stopped after them.
  restartPolicy: Always
  args: ["--sidecar"]
  envFrom:
    - configMapRef:
        name: {{ $name }}-sidecar-settings
  env:
    # The CA and serving certificate are made at start: the CA certificate goes to the
    # volume the app reads (AZURE_KUBERNETES_CA_FILE), the serving key stays in the
    # sidecar's own in-memory volume. Nothing to distribute or rotate.
    - name: IBP_SIDECAR_CA_OUT
      value: /var/run/identity-binding-proxy/ca.crt
    - name: IBP_TLS
      value: identity-binding-proxy.sidecar.internal=/var/run/identity-binding-proxy-tls/tls.crt,/var/run/identity-binding-proxy-tls/tls.key
    - name: IBP_DEFAULT_SNI
      value: identity-binding-proxy.sidecar.internal
    - name: IBP_ISSUER_KEY
      value: {{ range $i, $f := .Values.issuer.keyFiles }}{{ if $i }},{{ end }}/etc/identity-binding-proxy/issuer/{{ $f }}{{ end }}
    - name: IBP_BINDINGS
      value: /etc/identity-binding-proxy/bindings/bindings.yaml
    # Loopback only: the pod's own containers, nobody else. Ports chosen away from the
    # 8443/9090 an app may use itself.
    - name: IBP_LISTEN
      value: 127.0.0.1:18443
    - name: IBP_ADMIN_LISTEN
      value: 127.0.0.1:19090
    # The pod may read the cluster JWKS (system:service-account-issuer-discovery) but
    # may not create TokenReviews.
    - name: IBP_AUTHN_MODE
      value: local
    # No RBAC watch from a workload pod: a revoked grant is refused once the cached
    # allow expires, within 60 s (one SelfSubjectAccessReview a minute per identity).
    - name: IBP_AUTHZ_ALLOWED_TTL_SECS
      value: "60"
    - name: IBP_STATE_DIR
      value: /var/lib/identity-binding-proxy
    # No Service sends to a sidecar: nothing to wait for at SIGTERM, and the app has
    # stopped before it.
    - name: IBP_SHUTDOWN_DELAY_SECS
      value: "0"
    - name: IBP_DRAIN_TIMEOUT_SECS
      value: "5"
    # One pod's token requests: one thread is plenty.
    - name: IBP_WORKER_THREADS
      value: "1"
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # Kubelet's HTTP probes go to the pod IP, which a loopback listener never sees: the
  # probes run the binary's own `probe` in the container. The startup probe holds the
  # app containers until the sidecar is ready (JWKS loaded, CA written).
  startupProbe:
    exec:
      command: ["/usr/local/bin/identity-binding-proxy", "probe", "http://127.0.0.1:19090/readyz"]
    periodSeconds: 1
    timeoutSeconds: 3
    failureThreshold: 60
  livenessProbe:
    exec:
      command: ["/usr/local/bin/identity-binding-proxy", "probe", "http://127.0.0.1:19090/livez"]
    periodSeconds: 20
    timeoutSeconds: 3
    failureThreshold: 3
  # Measured idle (release build, one worker): RSS 17 MiB, CPU 0.02 % of a core.
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: identity-binding-proxy-ca
      mountPath: /var/run/identity-binding-proxy
    - name: identity-binding-proxy-tls
      mountPath: /var/run/identity-binding-proxy-tls
    - name: identity-binding-proxy-issuer-key
      mountPath: /etc/identity-binding-proxy/issuer
      readOnly: true
    - name: identity-binding-proxy-bindings
      mountPath: /etc/identity-binding-proxy/bindings
      readOnly: true
    - name: identity-binding-proxy-state
      mountPath: /var/lib/identity-binding-proxy
    # The pod's own API token, for the sidecar alone (the app needs none): the
    # in-cluster configuration reads it here.
    - name: identity-binding-proxy-api-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
{{- end -}}

{{/* The app container's environment (list items): the webhook keeps variables a pod has. */}}
{{- define "identity-binding-proxy.sidecar.appEnv" -}}
{{- include "ibp.sidecar.check" . -}}
- name: AZURE_KUBERNETES_TOKEN_PROXY
  value: https://127.0.0.1:18443
- name: AZURE_KUBERNETES_SNI_NAME
  value: identity-binding-proxy.sidecar.internal
- name: AZURE_KUBERNETES_CA_FILE
  value: /var/run/identity-binding-proxy/ca.crt
{{- end -}}

{{/* The app container's volume mount (list item): the CA the sidecar writes. */}}
{{- define "identity-binding-proxy.sidecar.appVolumeMounts" -}}
{{- include "ibp.sidecar.check" . -}}
- name: identity-binding-proxy-ca
  mountPath: /var/run/identity-binding-proxy
  readOnly: true
{{- end -}}

{{/* The pod's volumes (list items). */}}
{{- define "identity-binding-proxy.sidecar.volumes" -}}
{{- include "ibp.sidecar.check" . -}}
- name: identity-binding-proxy-ca
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: identity-binding-proxy-tls
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: identity-binding-proxy-issuer-key
  secret:
    secretName: {{ required "issuer.keySecretName is required" .Values.issuer.keySecretName }}
    # 0440 (decimal: YAML parsers disagree on a leading 0): readable through the pod's
    # fsGroup (the sidecar runs as 65532).
    defaultMode: 288
- name: identity-binding-proxy-bindings
  configMap:
    name: {{ include "ibp.fullname" . }}-sidecar-bindings
- name: identity-binding-proxy-state
  emptyDir:
    sizeLimit: 16Mi
- name: identity-binding-proxy-api-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end -}}
